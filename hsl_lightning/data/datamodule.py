"""The federated data module: each institution's train/val/test data plus its SAT data.

Works two ways: the Federation asks for one node's (or several pooled nodes') loaders, round
by round; a plain ``lightning.Trainer`` gets the standard hooks (training on all nodes pooled,
i.e. central learning, and one validation/test loader per node).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch

from hsl_lightning.data.base import SPLITS, HostedElsewhere, ImageSet, Source, harmonize, unit
from hsl_lightning.data.heterogeneity import Acquisition, ExternalSite, Scenario, partition, stratified_split
from hsl_lightning.data.sampling import eval_loader, paired_loader, prepare_batch, site_loader
from hsl_lightning.data.synthetic import SyntheticAnchor, SyntheticLesions
from hsl_lightning.errors import HSLError


@dataclass
class NodeData:
    """One node's (institution's) splits, its acquisition (scanner) and its rows of the SAT training pool."""
    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    acquisition: Acquisition
    sat_index: torch.Tensor  # this node's rows of the SAT training pool

    def split(self, name: str) -> ImageSet:
        return getattr(self, name)


class FederatedDataModule(L.LightningDataModule):
    """Simulated (or real) institutions with a primary task and a Shared Anchor Task.

    Args:
        primary: the primary task's source (default: synthetic lesions).
        sat: the Shared Anchor Task's source (default: synthetic chest films).
        use_sat: train with the SAT (false: primary only, e.g. for ablations).
        scenario: how nodes differ (feature, label, quantity skew); ignored for partitioning
            when the source is already split by institution (image folders).
        root: data folder for file-based sources (MedMNIST); also read from ``HSL_DATA_ROOT``.
        image_size: resize every image to this many px (default: the primary source's size).
        splits: ``official``: partition the source's own train/val/test separately;
            ``pooled``: pool everything and split each node by ``split_fractions``.
        split_fractions: train/val/test fractions of each node for ``pooled`` splits (and for
            sources that have no official splits).
        sat_mode: ``shard``: disjoint IID shards of the SAT pool; ``copy``: every node holds the
            same SAT images.
        sat_fraction: fraction of the SAT pool per node (default 1/num_nodes for shard, 1 for copy).
        batch_size: training batch (B primary images paired with B SAT images).
        eval_batch_size: evaluation batch.
        augment: random flip and rotation up to 15 degrees during training.
        rebalance: draw primary samples for an expected 50/50 class ratio.
        samples_per_epoch: pairs per local epoch: a number, ``longer`` (the default, as the
            reference trains: max(primary, SAT) of the node, so a node whose SAT shard outnumbers
            its primary images revisits them several times per epoch) or ``primary`` (the node's
            primary set size, the SAT side drawn to match: the same optimizer steps per epoch as a
            single-task model on the same node, for comparisons at an equal budget).
        seed: seeds everything about the simulated world (partition, scanners, SAT shards).
        external: an institution that never trains (:class:`ExternalSite`): its images are taken
            out of the source before the nodes are drawn, and the Federation scores every deployed
            model on them at the end (``summary.json``'s ``external``).
    """

    def __init__(
        self,
        primary: Source | None = None,
        sat: Source | None = None,
        use_sat: bool = True,
        scenario: Scenario | None = None,
        root: str | None = None,
        image_size: int | None = None,
        splits: Literal["official", "pooled"] = "official",
        split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
        sat_mode: Literal["shard", "copy"] = "shard",
        sat_fraction: float | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        augment: bool = True,
        rebalance: bool = True,
        samples_per_epoch: int | Literal["longer", "primary"] | None = None,
        seed: int = 0,
        external: ExternalSite | None = None,
    ):
        super().__init__()
        self.primary = primary if primary is not None else SyntheticLesions()
        self.sat = (sat if sat is not None else SyntheticAnchor()) if use_sat else None
        self.scenario = scenario if scenario is not None else Scenario()
        self.root, self.image_size, self.splits = root, image_size, splits
        if len(split_fractions) != 3 or min(split_fractions) < 0 or split_fractions[0] <= 0:
            raise HSLError(f"data.split_fractions must be three non-negative train/val/test fractions, got {split_fractions}.")
        self.split_fractions = tuple(split_fractions)
        self.sat_mode, self.sat_fraction = sat_mode, sat_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        if samples_per_epoch == "longer":
            samples_per_epoch = None
        if not (samples_per_epoch in (None, "primary") or (isinstance(samples_per_epoch, int)
                                                            and not isinstance(samples_per_epoch, bool)
                                                            and samples_per_epoch > 0)):
            raise HSLError(f"data.samples_per_epoch must be a positive number of pairs, 'longer' or 'primary', "
                           f"got {samples_per_epoch!r}.")
        self.augment, self.rebalance, self.samples_per_epoch, self.seed = augment, rebalance, samples_per_epoch, seed
        self.external = external
        self.external_data: ImageSet | None = None
        self.nodes: list[NodeData] | None = None
        self.size: int | None = None  # the image size training uses, once set up
        self._hosted = None  # node count -> the node indices whose images this process builds (None: all)
        self.sat_pool: ImageSet | None = None
        self.sat_eval: ImageSet | None = None
        self.test_pool: ImageSet | None = None  # every node's test images, before any scanner
        self._pool_seen: dict[int, ImageSet] = {}  # node -> the test pool through its scanner

    @property
    def in_chans(self) -> int:
        """The primary task's image channels (1 grey, 3 RGB)."""
        return self.primary.channels

    def reading(self) -> dict | None:
        """How the primary source decodes a file, for the deployed checkpoints (None: not a file source)."""
        return self.primary.reading() if hasattr(self.primary, "reading") else None

    @property
    def uses_sat(self) -> bool:
        """Whether a Shared Anchor Task is configured (``sat`` set)."""
        return self.sat is not None

    @property
    def node_names(self) -> list[str]:
        """The nodes' names, in order (sets the data up first)."""
        self.setup()
        return [n.name for n in self.nodes]

    # ----------------------------------------------------------------- building the world
    def host(self, hosted) -> None:
        """Build the images of only some nodes: ``hosted`` maps the node count to the indices this
        process hosts (a Federation rank passes its own). The others keep their labels, so sizes,
        class counts and the report are those of every node; their images are never built. Call
        before ``setup``; every node's data is exactly what a process that builds all of it gets."""
        if self.nodes is not None:
            raise HSLError("FederatedDataModule.host must be called before setup (the data is already built).")
        self._hosted = hosted

    def setup(self, stage: str | None = None) -> None:
        if self.nodes is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        raw = self.primary.load(self.root)
        raw, external = self._carve_external(raw)
        per_node = self._per_node_splits(raw, g)
        here = [splits for splits in per_node.values() if splits is not None]  # None: a node held at another site
        size = self.image_size or int(here[0]["train"].images.shape[-1])
        self.size = size
        if external is not None:
            images = harmonize(external.images, self.in_chans, size)
            g_ext = torch.Generator().manual_seed(self.seed * 1000 + 998)
            self.external_data = ImageSet(self.external.scanner(self.seed).apply(images, g_ext), external.labels)
        scanners = self.scenario.scanners(g, len(per_node))
        self.sat_pool, self.sat_eval = self._load_sat(size, g)
        sat_index = self._sat_shards(len(per_node), g)
        hosted = set(range(len(per_node))) if self._hosted is None else set(self._hosted(len(per_node)))
        self.test_pool = None if len(here) < len(per_node) else ImageSet.cat(  # needs every node's test images
            [ImageSet(harmonize(splits["test"].images, self.in_chans, size), splits["test"].labels) for splits in here])
        nodes = []
        for i, ((name, splits), scanner) in enumerate(zip(per_node.items(), scanners)):
            node_g = torch.Generator().manual_seed(self.seed * 1000 + i)  # per node: skipping one changes no other
            if splits is None:
                if i in hosted:
                    raise HSLError(f"Node '{name}' has no folder here ({self.primary.describe()}): it needs "
                                   f"<root>/{name}/<train|val|test>/<label>/*.png (in a deployment, at its own site).")
                none = torch.zeros(0, dtype=torch.long)
                nodes.append(NodeData(name, *(HostedElsewhere(name, none) for _ in SPLITS), scanner, sat_index[i]))
                continue
            if i in hosted:
                data = {s: ImageSet(scanner.apply(harmonize(splits[s].images, self.in_chans, size), node_g),
                                    splits[s].labels) for s in SPLITS}
            else:
                data = {s: HostedElsewhere(name, splits[s].labels) for s in SPLITS}
            per_node[name] = None  # the node's raw copy goes as soon as it is built
            if len(data["train"]) == 0:
                raise HSLError(f"Node '{name}' has no training samples. Check the scenario's sizes/prevalence "
                               f"for {self.primary.describe()} (it has too few images for this split).")
            nodes.append(NodeData(name, data["train"], data["val"], data["test"], scanner, sat_index[i]))
        self.nodes = nodes

    def _carve_external(self, raw: dict) -> tuple[dict, ImageSet | None]:
        """The source's splits without the external site's images, and those images (or None)."""
        if self.external is None:
            return raw, None
        if self.primary.per_node:
            raise HSLError("data.external takes its images out of one pooled source; this source is already split by "
                           "institution. Keep an institution's folder out of training instead, and score it with "
                           "its own data config.")
        g = torch.Generator().manual_seed(self.seed * 1000 + 999)
        kept, taken = {}, []
        for split, data in raw.items():
            site, rest = self.external.carve(data.labels, g)
            kept[split], taken = data.subset(rest), taken + [data.subset(site)]
        external = ImageSet.cat(taken)
        if len(external) == 0 or external.positives in (0, len(external)):
            raise HSLError(f"data.external '{self.external.name}' got {len(external)} images with {external.positives} "
                           f"positive(s) from {self.primary.describe()}: an AUC needs both classes. Raise its fraction "
                           "or move its prevalence away from 0 and 1.")
        return kept, external

    def external_loader(self, node: int = 0):
        """The external site's images, tagged as node ``node`` (for models that route by node)."""
        self.setup()
        if self.external_data is None:
            raise HSLError("This data module has no external site (data.external).")
        return eval_loader(self.external_data, self.sat_eval, self.eval_batch_size, self.seed + 7907, node)

    def _per_node_splits(self, raw: dict, g: torch.Generator) -> dict[str, dict[str, ImageSet]]:
        if self.primary.per_node:
            return raw
        names = self.scenario.node_names
        if ("all" in raw or self.splits == "pooled") and self.scenario.eval_sizes is not None:
            # evaluation sets sized apart from training sets: split the pool first, then partition each split
            pool = raw["all"] if "all" in raw else ImageSet.cat([raw[s] for s in SPLITS])
            parts = stratified_split(pool.labels, self.split_fractions, g)
            raw = {s: pool.subset(p) for s, p in zip(SPLITS, parts)}
        elif "all" in raw or self.splits == "pooled":
            pool = raw["all"] if "all" in raw else ImageSet.cat([raw[s] for s in SPLITS])
            counts = self.scenario.class_counts(pool.positives, len(pool) - pool.positives, g)
            out = {}
            for name, idx in zip(names, partition(pool.labels, counts, g)):
                node = pool.subset(idx)
                parts = stratified_split(node.labels, self.split_fractions, g)
                out[name] = {s: node.subset(p) for s, p in zip(SPLITS, parts)}
            return out
        out = {name: {} for name in names}
        shares = self.scenario.label_shares(g)  # one label mix per node, the same in every split
        for s in SPLITS:
            data = raw[s]
            counts = self.scenario.class_counts(data.positives, len(data) - data.positives, g, evaluation=s != "train",
                                                shares=shares)
            for name, idx in zip(names, partition(data.labels, counts, g)):
                out[name][s] = data.subset(idx)
        return out

    def _load_sat(self, size: int, g: torch.Generator) -> tuple[ImageSet | None, ImageSet | None]:
        if self.sat is None:
            return None, None
        raw = self.sat.load(self.root)
        if "all" in raw:
            train_idx, eval_idx = stratified_split(raw["all"].labels, (0.85, 0.15), g)
            pool, held = raw["all"].subset(train_idx), raw["all"].subset(eval_idx)
        else:
            pool, held = raw["train"], raw["test"]
        fix = lambda s: ImageSet(harmonize(s.images, self.in_chans, size), s.labels)  # noqa: E731
        return fix(pool), fix(held)

    def _sat_shards(self, n_nodes: int, g: torch.Generator) -> list[torch.Tensor]:
        if self.sat_pool is None:
            return [torch.zeros(0, dtype=torch.long)] * n_nodes
        n = len(self.sat_pool)
        if self.sat_mode == "copy":
            frac = 1.0 if self.sat_fraction is None else self.sat_fraction
            if not 0 < frac <= 1:
                raise HSLError(f"data.sat_fraction must lie in (0, 1] for sat_mode copy, got {frac}.")
            shared = torch.randperm(n, generator=g)[: max(1, round(frac * n))]
            return [shared] * n_nodes
        frac = 1.0 / n_nodes if self.sat_fraction is None else self.sat_fraction
        if not 0 < frac * n_nodes <= 1 + 1e-9:
            raise HSLError(f"data.sat_fraction={frac} with {n_nodes} disjoint shards needs more than the whole SAT "
                           f"pool; use at most {1 / n_nodes:.3g}, or sat_mode: copy.")
        perm, k = torch.randperm(n, generator=g), max(1, int(frac * n))
        return [perm[i * k: (i + 1) * k] for i in range(n_nodes)]

    # ----------------------------------------------------------------- loaders
    def sat_for(self, nodes: Sequence[int]) -> ImageSet | None:
        """The SAT training images of the given nodes (an image two nodes share counts once); None without a SAT."""
        if self.sat_pool is None:
            return None
        index = torch.unique(torch.cat([self.nodes[i].sat_index for i in nodes]))  # copies count once
        return self.sat_pool.subset(index)

    def train_loader(self, nodes: Sequence[int], seed: int, with_sat: bool = True, per_node_batch: bool = False):
        """Paired training batches of the given nodes pooled (one node for federated training);
        each batch says which node every image comes from (key ``node``). ``per_node_batch``: every
        batch holds the same number of images of each node (primary only; SplitAVG's fixed batch per site)."""
        self.setup()
        primary = ImageSet.cat([self.nodes[i].train for i in nodes])
        origin = torch.cat([torch.full((len(self.nodes[i].train),), i, dtype=torch.long) for i in nodes])
        per_epoch = len(primary) if self.samples_per_epoch == "primary" else self.samples_per_epoch
        if per_node_batch:
            if with_sat:
                raise HSLError("A batch with the same number of images per node is drawn for primary-only training "
                               "(splitavg); this model trains with a SAT.")
            return site_loader(primary, origin, self.batch_size, self.augment, self.rebalance, seed, per_epoch)
        sat = self.sat_for(nodes) if with_sat else None
        return paired_loader(primary, sat, self.batch_size, self.augment, self.rebalance, seed, per_epoch, origin)

    def eval_loader(self, node: int, split: str):
        """An evaluation loader of node ``node``'s ``split`` (``val`` or ``test``), each image with a fixed SAT
        partner."""
        self.setup()
        return eval_loader(self.nodes[node].split(split), self.sat_eval, self.eval_batch_size, self.seed + 7919 * (node + 1),
                           node)

    def pool_loader(self, node: int):
        """The test pool (the union of every node's test images, before any scanner) seen through
        node ``node``'s own acquisition: a larger test set with the same class-conditional images
        as the node's own, so the same expected AUC (prevalence does not move AUC's expectation).
        The scanner's noise is drawn from a generator of its own, so the node's own test images
        inside the pool get a fresh draw."""
        self.setup()
        if node not in self._pool_seen:
            g = torch.Generator().manual_seed(self.seed * 1000 + 500 + node)
            scanner = self.nodes[node].acquisition
            self._pool_seen[node] = ImageSet(scanner.apply(self.test_pool.images, g), self.test_pool.labels)
        return eval_loader(self._pool_seen[node], self.sat_eval, self.eval_batch_size,
                           self.seed + 7919 * (node + 1) + 7, node)

    def sat_reference(self, k: int = 64) -> torch.Tensor | None:
        """A fixed, seeded batch of public SAT images (float in [0, 1]) for 'reference' inference."""
        self.setup()
        if self.sat_eval is None or len(self.sat_eval) == 0:
            return None
        g = torch.Generator().manual_seed(self.seed + 104729)
        idx = torch.randperm(len(self.sat_eval), generator=g)[:k]
        return unit(self.sat_eval.images[idx])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Under a ``lightning.Trainer``: apply the batch's augmentation on its device (see sampling)."""
        return prepare_batch(batch)

    def train_dataloader(self):
        return self.train_loader(range(len(self.node_names)), self.seed)

    def val_dataloader(self):
        return [self.eval_loader(i, "val") for i in range(len(self.node_names))]

    def test_dataloader(self):
        return [self.eval_loader(i, "test") for i in range(len(self.node_names))]

    # ----------------------------------------------------------------- reporting
    def report(self) -> list[dict]:
        """How each node's data was drawn: sizes, positives, scanner, SAT images."""
        self.setup()
        rows, reading = [], self.reading()
        for n in self.nodes:
            row = {"name": n.name}
            for s in SPLITS:
                row[f"n_{s}"], row[f"pos_{s}"] = len(n.split(s)), n.split(s).positives
            row["n_sat"] = int(len(n.sat_index))
            row["acquisition"] = vars(n.acquisition)
            if reading is not None:  # how its files were decoded (a deployment's model.ckpt takes it from here)
                row["reading"] = reading
            rows.append(row)
        if self.external_data is not None:
            rows.append({"name": self.external.name, "external": True, "n_test": len(self.external_data),
                         "pos_test": self.external_data.positives,
                         "acquisition": vars(self.external.scanner(self.seed))})
        return rows
