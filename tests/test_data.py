import pytest
import torch

from hsl_lightning import HSLError, Scenario
from hsl_lightning.data.heterogeneity import Acquisition, partition, stratified_split
from hsl_lightning.data.sampling import PairedSampler, augment, prepare_batch
from hsl_lightning.data.synthetic import SyntheticAnchor, SyntheticLesions

from conftest import tiny_data, tiny_hsl


def pool(n_pos, n_neg):
    return torch.cat([torch.ones(n_pos), torch.zeros(n_neg)]).long()


def test_partition_hits_requested_prevalence_and_sizes():
    labels = pool(500, 500)
    sc = Scenario(num_nodes=3, sizes=[3, 2, 1], prevalence=[0.2, 0.5, 0.8])
    counts = sc.class_counts(500, 500, torch.Generator().manual_seed(0))
    parts = partition(labels, counts, torch.Generator().manual_seed(0))
    sizes = [len(p) for p in parts]
    prev = [float(labels[p].float().mean()) for p in parts]
    assert sizes[0] / sizes[2] == pytest.approx(3, rel=0.02) and sizes[1] / sizes[2] == pytest.approx(2, rel=0.02)
    assert prev == pytest.approx([0.2, 0.5, 0.8], abs=0.01)
    assert len(torch.unique(torch.cat(parts))) == sum(sizes)  # disjoint


def test_partition_scales_down_when_positives_run_short():
    sc = Scenario(num_nodes=2, prevalence=[0.9, 0.9])
    counts = sc.class_counts(100, 900, torch.Generator().manual_seed(0))
    assert sum(c[0] for c in counts) <= 100
    assert all(p / (p + n) == pytest.approx(0.9, abs=0.02) for p, n in counts)


def test_iid_partition_uses_every_sample_once():
    labels = pool(37, 64)
    counts = Scenario(num_nodes=4).class_counts(37, 64, torch.Generator().manual_seed(1))
    parts = partition(labels, counts, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(parts).tolist()) == list(range(101))


def test_dirichlet_label_skew_is_seeded_and_skewed():
    sc = Scenario(num_nodes=4, dirichlet_alpha=0.3)
    a = sc.class_counts(400, 400, torch.Generator().manual_seed(5))
    b = sc.class_counts(400, 400, torch.Generator().manual_seed(5))
    assert a == b
    prev = [p / max(1, p + n) for p, n in a]
    assert max(prev) - min(prev) > 0.2


def test_stratified_split_keeps_class_ratio():
    labels = pool(30, 70)
    parts = stratified_split(labels, (0.6, 0.2, 0.2), torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [60, 20, 20]
    assert [int(labels[p].sum()) for p in parts] == [18, 6, 6]


def test_scenario_rejects_inconsistent_lists():
    with pytest.raises(HSLError, match="sizes has 2 entries"):
        Scenario(num_nodes=3, sizes=[1, 2])
    with pytest.raises(HSLError, match="either prevalence or dirichlet"):
        Scenario(num_nodes=2, prevalence=[0.1, 0.2], dirichlet_alpha=1.0)


def test_acquisition_identity_and_effects():
    images = SyntheticLesions(num_samples=16, size=32).load()["all"].images
    g = torch.Generator().manual_seed(0)
    assert torch.equal(Acquisition().apply(images, g), images)
    darker = Acquisition(gain=0.5).apply(images, g)
    assert darker.float().mean() < 0.6 * images.float().mean()
    blurred = Acquisition(blur=1.5).apply(images, g).float()
    assert blurred.diff(dim=-1).abs().mean() < 0.7 * images.float().diff(dim=-1).abs().mean()


def test_synthetic_sources_are_seeded_and_balanced():
    a, b = SyntheticLesions(num_samples=50, seed=3).load()["all"], SyntheticLesions(num_samples=50, seed=3).load()["all"]
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert int(a.labels.sum()) == 25
    assert not torch.equal(SyntheticAnchor(num_samples=50, seed=3).load()["all"].images, a.images)


def test_paired_epoch_is_the_longer_side_and_primary_is_rebalanced():
    labels = pool(20, 180)
    sampler = PairedSampler(labels, sat_size=1000, rebalance=True, seed=0)
    pairs = list(sampler)
    assert len(pairs) == len(sampler) == 1000
    p = torch.tensor([i for i, _ in pairs])
    assert labels[p].float().mean() == pytest.approx(0.5, abs=0.05)
    s = sorted(j for _, j in pairs)
    assert s == list(range(1000))  # the longer SAT side is a permutation


def test_shorter_sat_side_is_resampled():
    sampler = PairedSampler(pool(100, 100), sat_size=30, rebalance=False, seed=0)
    sat = [j for _, j in sampler]
    assert len(sat) == 200 and set(sat) == set(range(30))


def test_sat_shards_are_disjoint_and_copies_identical():
    dm = tiny_data()
    dm.setup()
    shards = [set(n.sat_index.tolist()) for n in dm.nodes]
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1:])
    copy = tiny_data(sat_mode="copy", sat_fraction=0.5)
    copy.setup()
    assert all(torch.equal(n.sat_index, copy.nodes[0].sat_index) for n in copy.nodes)
    assert len(copy.nodes[0].sat_index) == round(0.5 * len(copy.sat_pool))


def test_batches_carry_paired_sat_images_in_unit_range():
    dm = tiny_data()
    batch = next(iter(dm.train_loader([0], seed=0)))
    assert batch["image"].shape == batch["sat_image"].shape == (32, 1, 28, 28)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert set(batch["sat_label"].tolist()) <= {0, 1}


def test_node_with_no_training_data_is_a_clear_error():
    dm = tiny_data(primary=SyntheticLesions(num_samples=6, size=28), scenario=Scenario(num_nodes=3, sizes=[100, 1, 1]))
    with pytest.raises(HSLError, match="no training samples"):
        dm.setup()


def test_eval_sizes_keep_evaluation_sets_equal_while_training_sizes_follow_the_sweep():
    sizes = {}
    for ratio in (1, 8):
        dm = tiny_data(use_sat=False, scenario=Scenario(num_nodes=2, sizes=[1, ratio], eval_sizes=[1, 1]))
        dm.setup()
        sizes[ratio] = [(len(n.train), len(n.val), len(n.test)) for n in dm.nodes]
    (a1, v1, t1), (b1, w1, u1) = sizes[1]
    (a8, v8, t8), (b8, w8, u8) = sizes[8]
    assert a1 == b1 and b8 >= 7 * a8  # training sets follow the ratio ...
    assert a1 + b1 == pytest.approx(a8 + b8, abs=2)  # ... at a constant total
    assert (v1, t1) == (w1, u1) == (v8, t8) == (w8, u8)  # evaluation sets stay equal


def test_batches_say_which_node_each_image_comes_from():
    dm = tiny_data(use_sat=False)
    batch = next(iter(dm.train_loader([0, 2], seed=0, with_sat=False)))
    assert set(batch["node"].tolist()) == {0, 2}
    assert next(iter(dm.eval_loader(1, "test")))["node"].unique().tolist() == [1]


def test_dirichlet_label_mix_is_the_same_in_every_split_of_a_node():
    official = tiny_data(use_sat=False, scenario=Scenario(num_nodes=3, dirichlet_alpha=0.3))
    official.primary.load = lambda root=None: {s: x for s, x in zip(("train", "val", "test"), _three_splits())}
    official.setup()
    for node in official.nodes:
        rates = [n.positives / max(1, len(n)) for n in (node.train, node.val, node.test)]
        assert max(rates) - min(rates) < 0.2, rates  # a node's splits share its label mix
    with pytest.raises(HSLError, match="eval_sizes cannot be combined with dirichlet_alpha"):
        Scenario(num_nodes=2, dirichlet_alpha=0.5, eval_sizes=[1, 1])


def _three_splits():
    from hsl_lightning.data.base import ImageSet

    g = torch.Generator().manual_seed(3)
    out = []
    for n in (600, 200, 200):
        labels = (torch.arange(n) % 2).long()
        out.append(ImageSet(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), labels))
    return out


def test_augmentation_is_drawn_in_the_loader_and_applied_where_the_batch_is_trained():
    dm = tiny_data()
    raw = next(iter(dm.train_loader([0], seed=5)))
    assert raw["image_theta"].shape == raw["sat_image_theta"].shape == (32, 2, 3)
    ready = prepare_batch(raw)
    assert "image_theta" not in ready and "sat_image_theta" not in ready and "image_theta" in raw  # raw untouched
    # exactly what warping in the loader did: the loader's generator (seed + 1), image first, then SAT
    g = torch.Generator().manual_seed(5 + 1)
    assert torch.equal(ready["image"], augment(raw["image"], g))
    assert torch.equal(ready["sat_image"], augment(raw["sat_image"], g))
    assert not torch.equal(ready["image"], raw["image"]) and 0 <= ready["image"].min() and ready["image"].max() <= 1
    assert prepare_batch(ready) is ready  # nothing pending: unchanged
    hooked = dm.on_after_batch_transfer(raw, 0)  # under a lightning.Trainer
    assert torch.equal(hooked["image"], ready["image"])
    plain = tiny_data(augment=False)
    assert "image_theta" not in next(iter(plain.train_loader([0], seed=5)))


def test_a_module_augments_a_raw_training_batch_itself():
    torch.manual_seed(0)
    model = tiny_hsl(expert_dropout=0.0, tower_dropout=0.0).eval()  # no dropout: two calls compare
    raw = next(iter(tiny_data().train_loader([0], seed=0)))
    assert torch.equal(model.training_step(raw, 0), model.training_step(prepare_batch(raw), 0))
    unaugmented = {k: v for k, v in raw.items() if not k.endswith("_theta")}
    assert not torch.equal(model.training_step(raw, 0), model.training_step(unaugmented, 0))


def test_a_process_builds_only_the_images_of_the_nodes_it_hosts():
    from hsl_lightning.data.base import HostedElsewhere

    full, part = tiny_data(), tiny_data()
    part.host(lambda n: {0, 2})
    full.setup(), part.setup()
    assert isinstance(part.nodes[1].train, HostedElsewhere) and isinstance(part.nodes[1].test, HostedElsewhere)
    for i in (0, 2):  # the hosted nodes' data is exactly that of a process that builds everything
        for split in ("train", "val", "test"):
            assert torch.equal(part.nodes[i].split(split).images, full.nodes[i].split(split).images)
    assert part.report() == full.report()  # sizes, class counts and scanners of every node
    with pytest.raises(HSLError, match="node1's images live on the rank that hosts it"):
        part.eval_loader(1, "test").dataset.data.images
    with pytest.raises(HSLError, match="before setup"):
        full.host(lambda n: {0})
