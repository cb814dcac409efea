"""Strategies: what institutions share after each round and how it is merged.

A strategy answers a few questions and nothing else, so a new method is a small class here,
not a change to the orchestrator loop:

- ``plan``: which institutions train together (one model per node; ``central``: one for all);
- ``shared_keys``: which state entries cross an institution's boundary;
- ``weight``: each institution's weight in the all-reduced sum;
- ``merge_kind``: the kind of merge (:mod:`~hsl_lightning.federation.merge`): ``Mean`` (the weighted
  mean, the default), ``Personal`` (``combine``: each node's next shared state from its own
  contribution and the reduced sum) or ``Server`` (``aggregate``: a server rule that needs every
  node's contribution, not only their sum, e.g. FedCOME);
- local-training hooks, called by the Federation around each institution's local training:
  ``begin_local`` / ``begin_epoch`` / ``local_loss`` (an extra loss term, e.g. FedProx) /
  ``after_backward`` (e.g. SCAFFOLD's gradient correction) / ``end_local``, which may return a
  vector to be summed over institutions in the same all-reduce as the weights, handed back to
  ``after_round`` (e.g. SCAFFOLD's control-variate updates);
- ``setup``: adapt the module to the federation once, before training (SplitAVG's site parts);
- ``traffic``: bytes that crossed institution boundaries during the round besides the state
  (SplitAVG's feature maps);
- ``state_dict`` / ``load_state_dict``: per-node state kept across rounds (control variates,
  previous models), saved in every round's checkpoint.

A class becomes a strategy by the :func:`register` decorator (``hsl strategies`` lists them in
the order they are registered). Strategies that override none of the local-training hooks
(:meth:`Strategy.local_hooks`) can train institutions fused (``fuse_institutions``).
"""

from __future__ import annotations

import copy
import inspect
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from hsl_lightning.errors import HSLError, suggest
from hsl_lightning.federation.merge import Mean, Merge, Personal, Server

Contribution = Literal["best", "last"]


def local_hook(hook):
    """Marks a method of :class:`Strategy` as a hook on one institution's own local training."""
    hook.local_hook = True
    return hook


class Strategy:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: which local state a node contributes: its best epoch of the round by local validation AUC, or its last
    default_contribution: ClassVar[Contribution] = "last"
    #: how the round's contributions are merged: Mean, Personal (``combine``) or Server (``aggregate``)
    merge_kind: ClassVar[type[Merge]] = Mean
    #: whether each node also trains and deploys a whole model of its own (Ditto), besides the shared one
    personal_model: ClassVar[bool] = False
    #: weight each node by its training-set size in the merge (FedAvg's rule); else all weigh 1
    size_weighted: ClassVar[bool] = False
    #: ``end_local`` reads the module's weights after the last local epoch (so a node contributing
    #: its best epoch instead would pair one epoch's weights with another's strategy state)
    reads_last_epoch: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        old = [name for name in ("personal", "server_aggregates") if name in vars(cls)]
        if old:  # the flags that merge_kind replaced: a strategy setting them would silently take the mean
            raise TypeError(f"{cls.__name__} sets {', '.join(old)}, which no longer exist: set merge_kind = Personal "
                            "(for combine) or merge_kind = Server (for aggregate), from "
                            "hsl_lightning.federation.merge.")

    @classmethod
    def local_hooks(cls) -> list[str]:
        """The hooks on local training (marked ``@local_hook`` below) that this strategy overrides."""
        hooks = [name for name, value in vars(Strategy).items() if getattr(value, "local_hook", False)]
        return [name for name in hooks if getattr(cls, name) is not getattr(Strategy, name)]

    @classmethod
    def fusable(cls) -> bool:
        """Whether a rank's institutions can train as one model: nothing acts on one institution's training."""
        return not cls.local_hooks() and not cls.personal_model

    @classmethod
    def concurrent(cls) -> bool:
        """Whether a rank's institutions can train at the same time in threads, each in its own copy of
        the module: no local-training hooks (they keep a trainee's state in the strategy object) and no
        traffic read from the module after the round."""
        return not cls.local_hooks() and cls.traffic is Strategy.traffic

    def options(self) -> dict:
        """The strategy's settings (its constructor's arguments), for logs and configs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def plan(self, num_nodes: int) -> list[tuple[int, ...]]:
        return [(i,) for i in range(num_nodes)]

    def shared_keys(self, module: nn.Module) -> list[str]:
        return list(module.state_dict())

    def weight(self, n_train: int) -> float:
        return float(n_train) if self.size_weighted else 1.0

    def combine(self, own: torch.Tensor, total: torch.Tensor, own_weight: float, total_weight: float) -> torch.Tensor:
        """(``Personal`` merges) a node's next shared state from its own contribution and the sum."""
        return total / total_weight

    def setup(self, module: nn.Module, num_nodes: int) -> None:
        """Adapt the module to a federation of ``num_nodes`` nodes, once, before anything is copied."""

    def aggregate(self, received: torch.Tensor, contributions: torch.Tensor, sizes: torch.Tensor,
                  is_param: torch.Tensor) -> torch.Tensor:
        """(``Server`` merges) the next shared state from the state every node received
        (d,), each node's contribution (N, d), training-set sizes (N,) and which of the d entries are
        trainable parameters (the rest are buffers such as BatchNorm statistics)."""
        raise NotImplementedError

    def loader_options(self) -> dict:
        """Keyword arguments for the data module's ``train_loader`` (e.g. SplitAVG's fixed batch per site)."""
        return {}

    def traffic(self, module: nn.Module) -> int:
        """Bytes that crossed institution boundaries this round besides the shared state and
        ``end_local`` vectors (0 for weight-sharing methods); called once per round, after training."""
        return 0

    def state_dict(self) -> dict:
        """Per-node state that must survive across rounds (saved in checkpoints); tensors, numbers,
        strings and dicts / lists of them only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    # --- local-training hooks (all optional) ------------------------------------------
    @local_hook
    def begin_local(self, module: nn.Module, trainee: int) -> None:
        """An institution starts a round's local training, its model holding what it received."""

    @local_hook
    def begin_epoch(self, module: nn.Module, epoch: int, num_epochs: int) -> None:
        """A local epoch starts."""

    @local_hook
    def local_loss(self, module: nn.Module, batch: dict) -> torch.Tensor | None:
        """An extra term added to every local training step's loss (None: nothing)."""
        return None

    @local_hook
    def after_backward(self, module: nn.Module) -> None:
        """Gradients are computed; the optimizer steps next."""

    def extra_size(self, module: nn.Module) -> int:
        """Length of the vector ``end_local`` returns (0: none)."""
        return 0

    @local_hook
    def end_local(self, module: nn.Module, trainee: int, steps: int, optimizer) -> torch.Tensor | None:
        """Local training ended after ``steps`` optimizer steps; optionally return a float64
        vector of ``extra_size`` to be summed over all institutions."""
        return None

    def abort_local(self, module: nn.Module, trainee: int) -> None:
        """Local training failed part-way (the node is dropped from the round): undo what
        ``begin_local`` set up; the node's per-round state is not updated."""

    def after_round(self, extra_total: torch.Tensor | None, num_trainees: int) -> None:
        """The round's all-reduce is done; ``extra_total`` is the sum of ``end_local`` vectors
        (of the nodes that finished the round); ``num_trainees`` counts all nodes."""

    @local_hook
    def begin_personal(self, module: nn.Module, trainee: int, received: dict[str, torch.Tensor]) -> None:
        """(``personal_model`` strategies) the node's own model is loaded and about to train;
        ``received`` is the state the node received this round."""

    @local_hook
    def end_personal(self, module: nn.Module, trainee: int) -> None:
        """(``personal_model`` strategies) the node's own model finished this round's training."""


#: every registered strategy by name, in the order of registration
STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` a strategy, known by ``cls.name`` (to ``hsl strategies``, configs
    and :func:`get_strategy`)."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or not cls.name:
        raise TypeError(f"register takes a Strategy subclass with a name, got {cls!r}.")
    taken = STRATEGIES.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"Strategy name '{cls.name}' is taken by {taken.__module__}.{taken.__qualname__}.")
    STRATEGIES[cls.name] = cls
    return cls


@register
class HSL(Strategy):
    name = "hsl"
    description = ("HeteroSync Learning sync: unweighted mean of every state entry (encoders, experts, gates, "
                   "towers, BatchNorm statistics); each node contributes its best epoch of the round")
    default_contribution = "best"


@register
class FedAvg(Strategy):
    name = "fedavg"
    description = "FedAvg (McMahan et al. 2017): mean of every state entry weighted by each node's training-set size"
    size_weighted = True


@register
class Swarm(Strategy):
    name = "swarm"
    description = ("Swarm Learning (Warnat-Herresthal et al. 2021): decentralised unweighted mean of every entry, "
                   "no server; the HSL sync without the SAT")


@register
class Personalized(Strategy):
    """The HSL paper's Personalized Learning baseline: w_i <- 0.5 w_i + 0.5 mean_{j != i} w_j.

    The mean of the others is recovered from the all-reduced sum: (sum - w_i) / (N - 1). With a
    single node there are no others and the node keeps its own weights.
    """

    name = "personalized"
    description = "Personalized Learning (HSL paper baseline): each node keeps 0.5 own + 0.5 mean of the other nodes"
    merge_kind = Personal

    def combine(self, own, total, own_weight, total_weight):
        if total_weight - own_weight <= 0:
            return own.clone()
        others = (total - own_weight * own) / (total_weight - own_weight)
        return 0.5 * own + 0.5 * others


def _proximal_term(anchor: list[tuple[torch.Tensor, torch.Tensor]], coef: float) -> torch.Tensor | None:
    """coef/2 * sum ||p - p_anchor||^2 over (parameter, anchor) pairs; None when there is nothing to add."""
    if not anchor or coef == 0:
        return None
    return 0.5 * coef * sum(((p - a) ** 2).sum() for p, a in anchor)


@register
class FedProx(Strategy):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2).

    Each node minimises h_k(w) = F_k(w) + mu/2 * ||w - w^t||^2, where w^t is the model it received
    at the start of the round; aggregation is FedAvg's (weighted by training-set size). The
    proximal term covers every trainable parameter (BatchNorm statistics are buffers, not in it).
    """

    name = "fedprox"
    description = "FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 in the local loss"
    size_weighted = True

    def __init__(self, mu: float = 0.01):
        if mu < 0:
            raise HSLError(f"fedprox mu must be non-negative, got {mu}.")
        self.mu = mu
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_local(self, module, trainee):
        self._anchor = [(p, p.detach().clone()) for p in module.parameters() if p.requires_grad]

    def local_loss(self, module, batch):
        return _proximal_term(self._anchor, self.mu)


def _prefixed_keys(module: nn.Module, predicate) -> set[str]:
    keys = set()
    for prefix, sub in module.named_modules():
        if predicate(prefix, sub):
            keys.update(f"{prefix}.{k}" if prefix else k for k in sub.state_dict())
    return keys


def _head_prefixes(module: nn.Module, strategy: str) -> tuple[str, ...]:
    prefixes = tuple(getattr(module, "head_prefixes", ()))
    if not prefixes:
        raise HSLError(f"{strategy} needs the module to name its personal layers: {type(module).__name__} has no "
                       "head_prefixes.")
    return prefixes


@register
class FedBN(Strategy):
    """FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization", ICLR 2021): every BatchNorm layer (affine weights and running statistics)
    stays local; the rest is averaged. Choice: averaged with FedAvg's size weights (the paper's
    experiments use equal-sized clients, where the two coincide)."""

    name = "fedbn"
    description = "FedBN (Li et al. 2021): BatchNorm weights and statistics stay local, the rest is size-weighted mean"
    size_weighted = True

    def shared_keys(self, module):
        local = _prefixed_keys(module, lambda _, m: isinstance(m, nn.modules.batchnorm._BatchNorm))
        return [k for k in module.state_dict() if k not in local]


@register
class FedPer(Strategy):
    """FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019):
    base layers are averaged FedAvg-style, the personalisation layers stay local. Which layers
    are personal is the module's ``head_prefixes`` (the classifier head; HSL's task towers)."""

    name = "fedper"
    description = "FedPer (Arivazhagan et al. 2019): shared base layers (size-weighted mean), personal head stays local"
    size_weighted = True

    def shared_keys(self, module):
        prefixes = _head_prefixes(module, self.name)
        return [k for k in module.state_dict() if not k.startswith(prefixes)]


@register
class FedRep(Strategy):
    """FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated
    Learning", ICML 2021, Algorithm 1): the representation (body) is averaged, each node keeps its
    head. Locally a node first trains only its head for ``local_epochs - body_epochs`` epochs with
    the body frozen, then only the body for ``body_epochs`` epochs with the head frozen. The head is
    the module's ``head_prefixes``. Aggregation: unweighted mean of the bodies, as in the paper."""

    name = "fedrep"
    description = ("FedRep (Collins et al. 2021): shared body (unweighted mean), personal head; locally head "
                   "epochs first, then body epochs")

    def __init__(self, body_epochs: int = 1):
        if body_epochs < 1:
            raise HSLError(f"fedrep body_epochs must be at least 1, got {body_epochs}.")
        self.body_epochs = body_epochs
        self._trainable: dict[str, bool] = {}  # requires_grad before local training, restored after

    def shared_keys(self, module):
        prefixes = _head_prefixes(module, self.name)
        return [k for k in module.state_dict() if not k.startswith(prefixes)]

    def begin_local(self, module, trainee):
        self._trainable = {name: p.requires_grad for name, p in module.named_parameters()}

    def begin_epoch(self, module, epoch, num_epochs):
        if num_epochs <= self.body_epochs:
            raise HSLError(f"fedrep trains the head before the body: it needs local_epochs > body_epochs "
                           f"({self.body_epochs}), got local_epochs={num_epochs}.")
        train_head = epoch < num_epochs - self.body_epochs
        prefixes = _head_prefixes(module, self.name)
        for name, p in module.named_parameters():
            p.requires_grad_(self._trainable[name] and name.startswith(prefixes) == train_head)

    def end_local(self, module, trainee, steps, optimizer):
        for name, p in module.named_parameters():
            p.requires_grad_(self._trainable[name])
        return None

    def abort_local(self, module, trainee):
        if self._trainable:  # begin_local ran
            self.end_local(module, trainee, 0, None)


@register
class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020, Algorithm 1 with option II, all nodes every round, global step size 1).

    Node i corrects every local gradient by its control variate: y <- y - lr (g(y) - c_i + c);
    after K local steps, c_i+ = c_i - c + (x - y) / (K lr), where x is the model it received.
    The models are averaged unweighted and c <- c + mean_i (c_i+ - c_i): the control-variate
    deltas ride in the same all-reduce as the weights (so a node sends twice the parameters).
    The correction is applied to the gradient before the module's optimizer step. The update of
    c_i reads the step as plain SGD (y moved by lr times the corrected gradient, K times), so
    SCAFFOLD refuses other optimizers: under AdamW the moved distance is not lr times a gradient,
    and c_i comes out on the wrong scale (about 1,000 times the gradient's in our study's set-up).
    Use ``model.optimizer: sgd`` with ``momentum: 0``, as ``configs/methods/scaffold.yaml`` sets.
    """

    name = "scaffold"
    reads_last_epoch = True  # c_i+ comes from the distance the last epoch's weights moved
    description = "SCAFFOLD (Karimireddy et al. 2020): control variates correct each local gradient for client drift"

    def __init__(self):
        self._c: torch.Tensor | None = None  # the global control variate, identical on every rank
        self._ci: dict[int, torch.Tensor] = {}  # per hosted node
        self._params: list[nn.Parameter] = []
        self._x: torch.Tensor | None = None
        self._correction: list[torch.Tensor] = []

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def extra_size(self, module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def setup(self, module, num_nodes):
        name, momentum = getattr(module, "optimizer_name", "sgd"), getattr(module, "momentum", 0.0)
        if name != "sgd" or momentum:
            raise HSLError(f"scaffold's control variates assume plain SGD steps, but the model trains with "
                           f"{name}{f' (momentum {momentum})' if momentum else ''}. Set model.init_args.optimizer: sgd "
                           "and momentum: 0 (configs/methods/scaffold.yaml does), or use fedavg / fedprox with an "
                           "adaptive optimizer.")

    def begin_local(self, module, trainee):
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._x = self._flat().clone()
        if self._c is None:
            self._c = torch.zeros_like(self._x)
        ci = self._ci.setdefault(trainee, torch.zeros_like(self._x))
        self._correction = list((self._c - ci).split([p.numel() for p in self._params]))

    def after_backward(self, module):
        for p, corr in zip(self._params, self._correction):
            if p.grad is not None:
                p.grad.add_(corr.view_as(p))

    def end_local(self, module, trainee, steps, optimizer):
        plain = type(optimizer) is torch.optim.SGD and not optimizer.param_groups[0].get("momentum", 0)
        if not plain:
            raise HSLError(f"scaffold needs plain SGD (no momentum); configure_optimizers returned "
                           f"{type(optimizer).__name__}. Return torch.optim.SGD(params, lr, momentum=0).")
        lr = optimizer.param_groups[0]["lr"]
        old = self._ci[trainee]
        new = old - self._c + (self._x - self._flat()) / (max(1, steps) * lr)
        self._ci[trainee] = new
        return (new - old).double()

    def after_round(self, extra_total, num_trainees):
        update = (extra_total / num_trainees).float()
        self._c = update if self._c is None else self._c + update.to(self._c)  # None: this rank hosted no node yet

    def state_dict(self):
        return {"c": self._c, "ci": dict(self._ci)}

    def load_state_dict(self, state):
        self._c, self._ci = state["c"], dict(state["ci"])


@register
class Moon(Strategy):
    """MOON (Li, He and Song, "Model-Contrastive Federated Learning", CVPR 2021, Eq. 3-4).

    The local loss adds mu * l_con with
        l_con = -log( e^{sim(z, z_glob)/tau} / (e^{sim(z, z_glob)/tau} + e^{sim(z, z_prev)/tau}) ),
    where z is the representation of the model being trained, z_glob that of the model the node
    received this round and z_prev that of the node's own model after its previous round (the
    received model in the first round), sim the cosine similarity. Both reference models are frozen
    copies in eval mode. z is the output of the module's ``representation_layer()`` (the pooled
    encoder feature; the paper adds a projection head, which we leave out), taken from the training
    forward itself, so BatchNorm statistics move once per step as with every other method; z_glob
    and z_prev come from ``representation(batch)`` of the frozen copies. Aggregation as FedAvg.
    """

    name = "moon"
    reads_last_epoch = True  # the node's "previous model" is its last epoch's
    description = "MOON (Li et al. 2021): contrastive term pulls local representations to the global model's"
    size_weighted = True

    def __init__(self, mu: float = 1.0, temperature: float = 0.5):
        if mu < 0 or temperature <= 0:
            raise HSLError(f"moon needs mu >= 0 and temperature > 0, got mu={mu}, temperature={temperature}.")
        self.mu, self.temperature = mu, temperature
        self._previous_states: dict[int, dict[str, torch.Tensor]] = {}  # per hosted node, kept across rounds
        self._global = self._previous = None
        self._hook = None
        self._z: torch.Tensor | None = None  # the training forward's representation of the current batch

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        twin = copy.deepcopy(module).eval()
        for p in twin.parameters():
            p.requires_grad_(False)
        return twin

    def begin_local(self, module, trainee):
        if not hasattr(module, "representation") or not hasattr(module, "representation_layer"):
            raise HSLError(f"moon needs the module's representation(batch) and representation_layer(); "
                           f"{type(module).__name__} lacks them.")
        self._global = self._frozen_copy(module)  # copied before the hook below, so the copies carry none
        self._previous = self._frozen_copy(module)
        if trainee in self._previous_states:
            self._previous.load_state_dict(self._previous_states[trainee])

        def keep(_, __, output):
            if module.training:  # the training forward, not an evaluation inside the round
                self._z = output

        self._hook = module.representation_layer().register_forward_hook(keep)

    def contrastive_loss(self, z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
        sims = torch.stack([F.cosine_similarity(z, z_glob, dim=1), F.cosine_similarity(z, z_prev, dim=1)], dim=1)
        target = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)  # the global model is the positive
        return F.cross_entropy(sims / self.temperature, target)

    def local_loss(self, module, batch):
        z, self._z = self._z, None
        if self.mu == 0:
            return None
        if z is None:
            raise HSLError(f"moon: the training forward of {type(module).__name__} did not run its "
                           "representation_layer(), so there is no representation to contrast.")
        with torch.no_grad():
            z_glob, z_prev = self._global.representation(batch), self._previous.representation(batch)
        return self.mu * self.contrastive_loss(z, z_glob, z_prev)

    def end_local(self, module, trainee, steps, optimizer):
        self._previous_states[trainee] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.abort_local(module, trainee)
        return None

    def abort_local(self, module, trainee):
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._z, self._global, self._previous = None, None, None, None

    def state_dict(self):
        return {"previous": dict(self._previous_states)}

    def load_state_dict(self, state):
        self._previous_states = dict(state["previous"])


@register
class Ditto(Strategy):
    """Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021, Algorithm 1 and Eq. 2).

    Each round a node (1) trains the received global model w^t on its data as in FedAvg and
    contributes it (size-weighted mean), then (2) trains its own model v_k on
    F_k(v) + lambda/2 ||v - w^t||^2 for the same number of local epochs; it deploys v_k. Choice:
    lambda = 0.1 by default (the paper tunes it per data set); v_k starts from w^1 in the first round.
    """

    name = "ditto"
    description = "Ditto (Li et al. 2021): FedAvg global model plus a personal model kept near it by lambda/2 ||v - w||^2"
    size_weighted = True
    personal_model = True

    def __init__(self, lam: float = 0.1):
        if lam < 0:
            raise HSLError(f"ditto lam must be non-negative, got {lam}.")
        self.lam = lam
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_personal(self, module, trainee, received):
        self._anchor = [(p, received[name].to(p.device)) for name, p in module.named_parameters() if p.requires_grad]

    def local_loss(self, module, batch):
        return _proximal_term(self._anchor, self.lam)  # no anchor during the shared model's plain pass

    def end_personal(self, module, trainee):
        self._anchor = []


@register
class SplitAVG(Strategy):
    """SplitAVG (Zhang, Qu, Singh, Kalpathy-Cramer and Rubin, "SplitAVG: A heterogeneity-aware
    federated deep learning method for medical imaging", IEEE JBHI 26(9), 2022).

    The network is split at a cut layer (:class:`~hsl_lightning.modules.SplitClassifier`): each
    institution keeps its own site part; the server part is trained on the concatenation of all
    institutions' feature maps, so it fits one model to the union of the data distributions (the
    paper's "network split and feature map concatenation"). All institutions train together,
    step by step, so the whole federation is one trainee (on rank 0).

    **This method sends feature maps, not only weights**: every step, each institution sends the
    feature maps of its images at the cut and their labels, and receives their gradient. The run
    logs these bytes per round (``bytes_features_round``). No weights are exchanged.

    Choices, where the paper (abstract) and the authors' code (github.com/zm17943/SplitAVG) leave
    them open or differ from exact split training: cut ``conv1`` by default, as in their code;
    site parts are never averaged, as in their code; each site receives the exact gradient of its
    own slice (their code sends one gradient averaged over the sites' slices). A step's batch holds
    the same number of images from every site (``site_batch: fixed``, as their code draws it:
    data.batch_size split evenly, at least one image per site, an epoch as many steps as the pooled
    data would make), or is drawn from the union of the sites' training sets, each contributing
    in proportion to its size (``site_batch: proportional``, what this library did before).
    """

    name = "splitavg"
    description = ("SplitAVG (Zhang et al. 2022): site parts stay local, a server part trains on all sites' "
                   "concatenated feature maps (sends feature maps)")

    def __init__(self, site_batch: str = "fixed"):
        if site_batch not in ("fixed", "proportional"):
            raise HSLError(f"splitavg site_batch must be fixed or proportional, got '{site_batch}'.")
        self.site_batch = site_batch

    def plan(self, num_nodes):
        return [tuple(range(num_nodes))]

    def shared_keys(self, module):
        return []

    def loader_options(self):
        return {"per_node_batch": self.site_batch == "fixed"}

    def setup(self, module, num_nodes):
        if not hasattr(module, "set_sites"):
            raise HSLError("splitavg trains a split network: use model class_path hsl_lightning.SplitClassifier "
                           "(see configs/methods/splitavg.yaml).")
        module.set_sites(num_nodes)

    def traffic(self, module):
        sent, module.traffic_bytes = module.traffic_bytes, 0
        return sent


def _hardest(sim: torch.Tensor, mask: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest (or smallest) similarities among ``mask``ed entries, and which exist."""
    fill = -torch.inf if largest else torch.inf
    k = min(k, sim.shape[1])
    values = sim.masked_fill(~mask, fill).topk(k, dim=1, largest=largest).values
    return values, torch.isfinite(values)


@register
class FedRCL(Strategy):
    """FedRCL (Seo, Kim, Kim and Han, "Relaxed Contrastive Learning for Federated Learning",
    CVPR 2024), in the form of the authors' implementation (github.com/skynbe/FedRCL,
    ``utils/loss.py``; the authors explain in their issue #1 that the penalty of the paper's RCL
    loss is implemented as a contrastive term whose positive similarity is the constant 1).

    The local loss adds, averaged over the backbone's feature levels (its stem and stages, pooled and
    L2-normalised, s_ij the cosine similarity, tau the temperature):

    - supervised contrastive term: for each anchor i, its hardest positive p (least similar
      sample of its class, itself if it has no classmate in the batch) against its ``negatives``
      most similar samples of the other class:
      -log( e^{s_ip/tau} / (e^{s_ip/tau} + sum_k e^{s_ik/tau}) );
    - divergence penalty: with m_i the similarity of the least similar other sample of i's class,
      s~_i = m_i if m_i >= ``threshold`` else -1 (no classmate: -1), the term
      -log( e^{1/tau} / (e^{1/tau} + e^{s~_i/tau}) ): it pushes apart classes whose samples have
      all collapsed together, which is the "relaxation" of plain supervised contrastive learning.

    Weights 1 and 1, tau = 0.05, threshold 0.7, negatives 2 are the authors' defaults. The levels
    are the stem and stages the timm backbone lists in ``feature_info``, tapped before their last
    activation (``tap: pre_activation``, as the authors' ResNet returns them; for a timm ResNet the
    input of the stem's ReLU and of each stage's last block's final ReLU), or at the stage outputs
    (``tap: post_activation``, what this library did before). The cross-entropy is the module's own
    BCE. Aggregation: unweighted mean, as in the authors' server.
    """

    name = "fedrcl"
    description = ("FedRCL (Seo et al. 2024): supervised contrastive term with a divergence penalty on "
                   "multi-level features in the local loss; unweighted mean")

    def __init__(self, scl_weight: float = 1.0, penalty_weight: float = 1.0, temperature: float = 0.05,
                 threshold: float = 0.7, negatives: int = 2, tap: str = "pre_activation"):
        if tap not in ("pre_activation", "post_activation"):
            raise HSLError(f"fedrcl tap must be pre_activation or post_activation, got '{tap}'.")
        self.tap = tap
        if temperature <= 0 or negatives < 1 or scl_weight < 0 or penalty_weight < 0:
            raise HSLError("fedrcl needs temperature > 0, negatives >= 1 and non-negative weights, got "
                           f"temperature={temperature}, negatives={negatives}, scl_weight={scl_weight}, "
                           f"penalty_weight={penalty_weight}.")
        self.scl_weight, self.penalty_weight = scl_weight, penalty_weight
        self.temperature, self.threshold, self.negatives = temperature, threshold, negatives
        self._hooks: list = []
        self._levels: list[torch.Tensor] = []

    def begin_local(self, module, trainee):
        if not hasattr(module, "feature_levels"):
            raise HSLError(f"fedrcl needs the module's feature levels; {type(module).__name__} has none "
                           "(use hsl_lightning.ClassifierModule, see configs/methods/fedrcl.yaml).")
        self._levels = []

        def add(x):
            if x.requires_grad:  # a training forward, not an evaluation
                # pooled at once: an in-place activation overwrites x right after a pre-hook
                self._levels.append(F.normalize(x.float().mean(dim=(2, 3)), dim=1))

        if self.tap == "post_activation":
            self._hooks = [m.register_forward_hook(lambda _, __, out: add(out)) for m in module.feature_levels()]
        else:
            self._hooks = [_last_activation(m).register_forward_pre_hook(lambda _, inputs: add(inputs[0]))
                           for m in module.feature_levels()]

    def rcl_loss(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contrastive term, penalty) for normalised features ``z`` (B, d) of one level."""
        tau = self.temperature
        sim = z @ z.T
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
        pos, _ = _hardest(sim, same, 1, largest=False)  # includes i itself: at worst s_ii = 1
        neg, has_neg = _hardest(sim, ~same, self.negatives, largest=True)
        logits = torch.cat([pos, neg.masked_fill(~has_neg, -torch.inf)], dim=1) / tau
        contrastive = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
        least, has_mate = _hardest(sim, same & ~eye, 1, largest=False)
        relaxed = torch.where(has_mate & (least >= self.threshold), least, torch.full_like(least, -1.0))[:, 0]
        penalty = F.softplus((relaxed - 1.0) / tau).mean()  # = -log(e^{1/tau} / (e^{1/tau} + e^{s~/tau}))
        return contrastive, penalty

    def local_loss(self, module, batch):
        levels, self._levels = self._levels, []
        if not levels:
            return None
        terms = [self.rcl_loss(z, batch["label"]) for z in levels]
        contrastive = sum(c for c, _ in terms) / len(terms)
        penalty = sum(p for _, p in terms) / len(terms)
        return self.scl_weight * contrastive + self.penalty_weight * penalty

    def end_local(self, module, trainee, steps, optimizer):
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._levels = [], []
        return None

    def abort_local(self, module, trainee):
        self.end_local(module, trainee, 0, None)


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Hardswish, nn.Mish, nn.PReLU)


def _last_activation(level: nn.Module) -> nn.Module:
    """The last activation module registered in ``level`` (itself, if it is one): for timm's
    ResNets the stage output's ReLU, so its input is the stage's pre-activation output."""
    found = [m for m in level.modules() if isinstance(m, ACTIVATIONS)]
    if not found:
        raise HSLError(f"fedrcl tap pre_activation found no activation module in feature level "
                       f"{type(level).__name__}; set strategy_options tap: post_activation.")
    return found[-1]


def consensus_coefficients(gram: torch.Tensor, sizes: torch.Tensor, iterations: int = 5000) -> torch.Tensor:
    """FedCOME's merge as coefficients on the updates: alpha = sum_i n_i x_i / sum_i n_i, where
    Delta x_i is node i's update corrected to the nearest vector in the cone
    {y : Delta_k . y >= 0 for every k}. By Moreau's decomposition x_i = e_i + lambda_i with
    lambda_i = argmin_{lambda >= 0} ||Delta (e_i + lambda)||^2, a non-negative least-squares problem
    in the Gram matrix ``gram`` = Delta^T Delta, solved here by accelerated projected gradient."""
    m = gram.shape[0]
    g = gram.double()
    scale = g.diagonal().max().clamp(min=1e-300)
    g = g / scale  # the solution does not depend on the scale
    step = 1.0 / (2 * torch.linalg.eigvalsh(g).max().clamp(min=1e-12))
    eye = torch.eye(m, dtype=torch.float64, device=g.device)
    lam = torch.zeros(m, m, dtype=torch.float64, device=g.device)  # row i: lambda_i
    momentum = lam.clone()
    t = 1.0
    for _ in range(iterations):
        grad = 2 * (eye + momentum) @ g
        nxt = (momentum - step * grad).clamp(min=0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum = nxt + ((t - 1) / t_next) * (nxt - lam)
        if torch.allclose(nxt, lam, atol=1e-13, rtol=0):
            lam = nxt
            break
        lam, t = nxt, t_next
    x = eye + lam
    w = sizes.double().to(g.device)
    return (w[:, None] * x).sum(0) / w.sum()


@register
class FedCOME(Strategy):
    """FedCOME (Zheng, Ye, Li and Gao, "Federated Learning via Consensus Mechanism on Heterogeneous
    Data: A New Perspective on Convergence", ICASSP 2024; arXiv 2311.12358).

    Consensus: after a round, the server adjusts each node's update Delta_i slightly, to the nearest
    vector that makes an acute (or right) angle with every node's original update, so that the
    merged step lowers no node's first-order risk; the adjusted updates are averaged with FedAvg's
    size weights. The adjustment is solved as in the authors' code (github.com/fedcome/fedcome,
    ``SIMPLE_SIMPLE_QP``): min_x ||Delta x - Delta_i||^2 s.t. Delta_k^T Delta x >= 0 for all k (see
    :func:`consensus_coefficients`). The merged step is a combination of the updates, so only
    their Gram matrix is needed to find it.

    Choices: the consensus covers the trainable parameters; buffers (BatchNorm statistics) take
    FedAvg's weighted mean. The authors' code also clips every coordinate of the merged step at
    0.005; the method's description does not, and the bound depends on the learning rate, so it is
    an option here (``clip``), off by default. All nodes take part every round (the paper's
    client-sampling rule for partial participation does not apply).
    """

    name = "fedcome"
    description = ("FedCOME (Zheng et al. 2024): server adjusts each update so the merged step lowers every "
                   "node's risk, then size-weighted mean")
    size_weighted = True
    merge_kind = Server

    def __init__(self, clip: float | None = None):
        if clip is not None and clip <= 0:
            raise HSLError(f"fedcome clip must be positive (or null for none), got {clip}.")
        self.clip = clip

    def aggregate(self, received, contributions, sizes, is_param):
        updates = contributions[:, is_param] - received[is_param]
        alpha = consensus_coefficients(updates @ updates.T, sizes)
        step = alpha.to(updates.dtype) @ updates
        if self.clip is not None:
            step = step.clamp(-self.clip, self.clip)
        merged = received.clone()
        merged[is_param] += step
        w = sizes.to(contributions.dtype)
        merged[~is_param] = (w @ contributions[:, ~is_param]) / w.sum()
        return merged


@register
class Foundation(Strategy):
    """Foundation-model baseline: a frozen pretrained encoder (``FoundationProbe``, the CLIP image
    tower by default) with a linear probe, federated (size-weighted mean of the probe: only the
    head crosses the boundary) or per node (``federated: false``: nothing is shared)."""

    name = "foundation"
    description = "Frozen pretrained encoder (CLIP image tower by default) + linear probe, federated or per node"
    size_weighted = True

    def __init__(self, federated: bool = True):
        self.federated = federated

    def shared_keys(self, module):
        if not any(p.requires_grad for p in module.parameters()) or all(p.requires_grad for p in module.parameters()):
            raise HSLError("foundation trains a frozen encoder's linear probe: use model class_path "
                           "hsl_lightning.FoundationProbe (see configs/methods/foundation.yaml).")
        if not self.federated:
            return []
        prefixes = _head_prefixes(module, self.name)
        return [k for k in module.state_dict() if k.startswith(prefixes)]


@register
class Local(Strategy):
    name = "local"
    description = "Local learning: every node trains alone, nothing is shared (lower bound)"

    def shared_keys(self, module):
        return []


@register
class Central(Strategy):
    name = "central"
    description = "Central learning: one model on all nodes' pooled training data (upper bound; moves data)"

    def plan(self, num_nodes):
        return [tuple(range(num_nodes))]

    def shared_keys(self, module):
        return []


def get_strategy(strategy: str | Strategy, options: dict | None = None) -> Strategy:
    """A strategy by name (``options``: its constructor's keyword arguments, e.g. ``{"mu": 0.1}``)."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise HSLError(f"Unknown strategy '{strategy}'.{suggest(strategy, STRATEGIES)} "
                       f"Available: {', '.join(STRATEGIES)}.")
    cls = STRATEGIES[strategy]
    # ``--federation.strategy_options.mu 0.1`` reaches us as the string "0.1": read such values as
    # YAML scalars, as a config file would have given them (a word stays a string).
    options = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in (options or {}).items()}
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise HSLError(f"Strategy '{strategy}' has no option {', '.join(unknown)}; "
                       f"it takes: {', '.join(accepted) or 'no options'}.")
    return cls(**options)
