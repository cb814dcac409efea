"""Secure aggregation (hsl_lightning/flower/secagg.py, federation/fixedpoint.py): the coordinator
gets masked replies that look uniform and their exact sum; a site lost after masking is recovered
with t of n shares; a substituted key or a corrupted reply is refused; a deployment with masking
gives the simulator's numbers bit for bit, a dropout included."""

import math

import numpy as np
import pytest
import torch
import yaml

from hsl_lightning.errors import HSLError
from hsl_lightning.federation import fixedpoint
from hsl_lightning.flower import protocol, secagg
from hsl_lightning.flower.keys import make_keys
from hsl_lightning.flower.transport import LocalSites

from test_flower import assert_same, config_for, deploy, deployed_weights, keyed, simulate, sites_for

SIZE = 4096


@pytest.fixture(scope="module")
def roster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    make_keys(folder, ["a", "b", "c", "d"], [])
    return folder


def consortium(tmp_path, roster, names=("a", "b", "c")):
    """Sites' masks for one run, each having checked the others' signed keys; the coordinator's side."""
    sites = [secagg.SiteMasks(tmp_path / n, i, n, "run-1", roster / n, roster) for i, n in enumerate(names)]
    adverts = {i: s.advert() for i, s in enumerate(sites)}
    for site in sites:
        site.accept(list(adverts.values()))
    coordinator = secagg.CoordinatorMasks(adverts)
    deals = {i: protocol.KeysReply(i, 0, site.deal(0, coordinator.t, True)) for i, site in enumerate(sites)}
    coordinator.take_deals(deals)
    for i, site in enumerate(sites):
        site.receive(1, coordinator.inbox.get(i, {}))
    return sites, coordinator


def contributions(n, seed=0):
    """n quantised contributions of realistic size: a model's entries times a normalised weight."""
    rng = np.random.default_rng(seed)
    values = [torch.from_numpy(rng.normal(0, 0.05, SIZE)) / n for _ in range(n)]
    return [fixedpoint.quantise(v, n, "a site", 1).numpy().view(np.uint64) for v in values]


def masked_replies(sites, quantised, active, round_no=1):
    replies = {}
    for i, (site, q) in enumerate(zip(sites, quantised)):
        if i in active:
            site.check_round(round_no, active, secagg.threshold(len(sites)))
            replies[i] = protocol.RoundReply(node=i, completed=round_no - 1, fixed=site.mask(q, round_no, active),
                                             seeds=site.reveal_seeds(round_no, active))
    return replies


def looks_uniform(values: np.ndarray) -> float:
    """p-value of a chi-square test that every byte of ``values`` is uniform on 0..255 (each of the
    8 byte lanes of the uint64 tested apart; the smallest p-value, Bonferroni-corrected)."""
    from scipy.stats import chisquare

    lanes = values.view(np.uint8).reshape(-1, 8)
    p = min(chisquare(np.bincount(lanes[:, k], minlength=256)).pvalue for k in range(8))
    return min(1.0, 8 * p)


def test_the_unmasked_sum_is_exactly_the_sum_of_the_quantised_contributions(tmp_path, roster):
    sites, coordinator = consortium(tmp_path, roster)
    quantised = contributions(3)
    replies = masked_replies(sites, quantised, [0, 1, 2])
    total = coordinator.total(replies, 1, [0, 1, 2], recover=lambda dropped: pytest.fail("nobody dropped"))
    assert np.array_equal(total, np.sum([q.view(np.int64) for q in quantised], axis=0))
    # and it reads back as the float sum to within the derived bound
    exact = sum(torch.from_numpy(q.view(np.int64)).double() / fixedpoint.SCALE for q in quantised)
    assert float((fixedpoint.dequantise(torch.from_numpy(total)) - exact).abs().max()) == 0.0


def test_a_masked_reply_looks_uniform_and_the_test_rejects_weak_masks(tmp_path, roster):
    sites, _ = consortium(tmp_path, roster)
    quantised = contributions(3)
    reply = sites[0].mask(quantised[0], 1, [0, 1, 2])
    assert looks_uniform(reply) > 1e-3
    # and with its self mask taken off (as the coordinator can, from the seed shares): the pairwise masks alone
    replies = masked_replies(sites, quantised, [0, 1, 2])
    seed = secagg.combine([tuple(r.seeds["0"]) for r in replies.values()])
    assert looks_uniform(replies[0].fixed - secagg.prg(seed, SIZE, 0)) > 1e-3
    # the same test rejects what a weaker scheme would send: the contribution itself, a 32-bit mask
    # (Flower's mask generator folds its seed to 32 bits and draws from numpy's RandomState)
    assert looks_uniform(quantised[0]) < 1e-6
    weak = quantised[0] + np.random.RandomState(12345).randint(0, 2 ** 32, SIZE, dtype=np.uint64)
    assert looks_uniform(weak) < 1e-6
    # two runs of the same contribution carry different masks (fresh keys and seeds, not the run's seed)
    again, _ = consortium(tmp_path / "again", roster)
    assert not np.array_equal(again[0].mask(quantised[0], 1, [0, 1, 2]), reply)


def test_a_site_lost_after_masking_is_recovered_with_t_of_n_shares(tmp_path, roster):
    sites, coordinator = consortium(tmp_path, roster, names=("a", "b", "c", "d"))
    assert coordinator.t == 3  # two thirds of 4, rounded up
    quantised = contributions(4)
    replies = masked_replies(sites, quantised, [0, 1, 2, 3])
    del replies[2]  # site 2 masked with everyone, then never replied
    asked = []

    def recover(dropped):
        asked.append(dropped)
        return {i: protocol.Recovered(i, 0, sites[i].reveal_keys(dropped, 1)) for i in replies}

    total = coordinator.total(replies, 1, [0, 1, 2, 3], recover)
    assert asked == [[2]]
    assert np.array_equal(total, np.sum([quantised[i].view(np.int64) for i in (0, 1, 3)], axis=0))

    def too_few(dropped):  # only two of the three shares needed come back
        return {i: protocol.Recovered(i, 0, sites[i].reveal_keys(dropped, 1)) for i in (0, 1)}

    with pytest.raises(HSLError, match="only 2 of the 3 shares"):
        coordinator.total(replies, 1, [0, 1, 2, 3], too_few)


def test_shamir_shares_open_with_t_and_reveal_nothing_below():
    secret = bytes(range(32))
    shares = secagg.split(secret, 3, 5)
    assert secagg.combine(shares[:3]) == secret and secagg.combine([shares[4], shares[1], shares[2]]) == secret
    assert secagg.combine(shares[:2], 66) != secret.rjust(66, b"\0")  # two shares: some other number


def test_a_mask_key_the_coordinator_substituted_is_refused(tmp_path, roster):
    a = secagg.SiteMasks(tmp_path / "a", 0, "a", "run-1", roster / "a", roster)
    b = secagg.SiteMasks(tmp_path / "b", 1, "b", "run-1", roster / "b", roster)
    mallory = secagg.SiteMasks(tmp_path / "m", 1, "b", "run-1", roster / "d", roster)  # signs with another key
    with pytest.raises(HSLError, match="not signed by its node key"):
        a.accept([mallory.advert()])
    forged = {**b.advert(), "key": mallory.public.hex()}  # b's signature on another key
    with pytest.raises(HSLError, match="not signed by its node key"):
        a.accept([forged])
    with pytest.raises(HSLError, match="not in the consortium's public keys"):
        a.accept([{**b.advert(), "name": "eve"}])
    a.accept([b.advert()])  # the genuine one


def test_a_corrupted_or_out_of_range_reply_is_refused_naming_the_round(tmp_path, roster):
    from hsl_lightning.federation.message import MessageLayout, RoundMessage

    sites, coordinator = consortium(tmp_path, roster)
    layout = MessageLayout(state=SIZE - 5, extras=0, trainees=3)  # size SIZE: state, traffic, 3 flags, weight
    quantised = []
    for i in range(3):  # each a real contribution: weighted state, its finished flag, its normalised weight
        own = RoundMessage(layout)
        own.state.copy_(torch.from_numpy(np.random.default_rng(i).normal(0, 0.05, SIZE - 5)) / 3)
        own.add(i, 1 / 3)
        quantised.append(fixedpoint.quantise(own.vector, 3, f"node {i}", 1).numpy().view(np.uint64))
    replies = masked_replies(sites, quantised, [0, 1, 2])
    total = coordinator.total(replies, 1, [0, 1, 2], recover=lambda d: {})
    RoundMessage.from_fixed(layout, torch.from_numpy(total.copy()), 1)  # the genuine sum is accepted
    replies[1].fixed = replies[1].fixed ^ np.uint64(1 << 62)  # one bit flipped on the way
    total = coordinator.total(replies, 1, [0, 1, 2], recover=lambda d: {})
    with pytest.raises(HSLError, match="secure sum of round 1 is not a sum of valid contributions"):
        RoundMessage.from_fixed(layout, torch.from_numpy(total.copy()), 1)
    with pytest.raises(HSLError, match="contribution to round 4 is not finite"):
        fixedpoint.quantise(torch.tensor([0.0, math.inf]), 3, "node node1", 4)
    with pytest.raises(HSLError, match="contribution to round 2 holds a value of 3e\\+06, beyond"):
        fixedpoint.quantise(torch.full((SIZE,), 3e6, dtype=torch.float64), 3, "node node1", 2)


def test_a_site_refuses_what_would_open_its_own_reply(tmp_path, roster):
    """A coordinator that deviates: masking with the site alone, too low a threshold, too few sites,
    a site listed twice, key shares of a site the round was not masked with, a revealed key again."""
    sites, coordinator = consortium(tmp_path, roster, names=("a", "b", "c", "d"))
    site = sites[0]
    with pytest.raises(HSLError, match="fewer than the threshold"):
        site.check_round(1, [0], coordinator.t)  # alone: its self mask's shares would open it
    with pytest.raises(HSLError, match="a threshold of 1, below 3"):
        site.check_round(1, [0, 1, 2, 3], 1)
    with pytest.raises(HSLError, match="fewer than the threshold"):
        site.check_round(1, [0, 1], coordinator.t)
    with pytest.raises(HSLError, match="not among them"):
        site.check_round(1, [1, 2, 3], coordinator.t)
    adverts = coordinator.peers()
    with pytest.raises(HSLError, match="each site must appear once"):
        site.accept([*adverts, {**adverts[1], "node": 9}])
    with pytest.raises(HSLError, match="each site must appear once"):
        site.accept([{**adverts[1], "name": "../keys/b"}])
    site.check_round(1, [0, 1, 2], coordinator.t)
    with pytest.raises(HSLError, match="refuses to reveal key shares of sites \\[3\\]"):
        site.reveal_keys([3], 1)  # the round was not masked with site 3
    assert site.reveal_keys([2], 1)  # site 2 did drop: its shares, and its key is revoked here
    with pytest.raises(HSLError, match="whose key was revealed"):
        site.check_round(2, [0, 1, 2], coordinator.t)
    with pytest.raises(HSLError, match="more sites than the last round"):
        site.check_round(3, [0, 1, 3], coordinator.t)


def test_a_site_never_sends_its_contribution_unmasked(tmp_path):
    config = config_for("fedavg")
    site = sites_for(config, tmp_path / "sites")[0]
    merged = site.run.packer.pack(site.run.module.state_dict()).float().numpy()
    with pytest.raises(HSLError, match="carries no masking"):
        site.handle(protocol.Round(0, merged, validate=False, train=True))


class Vanishing(__import__("hsl_lightning.flower.site", fromlist=["Site"]).Site):
    """Site 1 masks round 2 with everyone, then its reply never comes."""

    def round(self, completed, merged, extras, validate, train, keep, secagg=None):
        reply = super().round(completed, merged, extras, validate, train, keep, secagg)
        if completed == 1 and train and self.node == 1:
            raise HSLError("stopped answering: no reply within 300 s")
        return reply


class Recording(LocalSites):
    """The coordinator's end of the transport, keeping every reply it received."""

    replies: list

    def exchange(self, requests, timeout_s):
        out = super().exchange(requests, timeout_s)
        self.replies = getattr(self, "replies", []) + list(out.values())
        return out


@pytest.mark.slow
def test_masked_deployment_equals_the_simulator_and_the_coordinator_never_holds_one_sites_vector(tmp_path,
                                                                                                 monkeypatch):
    config = config_for("fedavg", rounds=2)
    sim = simulate(config, tmp_path / "sim")
    own = []
    mask = secagg.SiteMasks.mask
    monkeypatch.setattr(secagg.SiteMasks, "mask", lambda self, q, r, a: own.append(q.copy()) or mask(self, q, r, a))
    transport = Recording(sites_for(config, tmp_path / "sites"))
    dep = deploy(config, tmp_path / "dep", transport)
    assert_same(sim, tmp_path / "sim", dep, tmp_path / "dep")
    assert any(isinstance(m, protocol.Keys) for _, m in transport.sent)  # masking was on
    assert len(own) == 6  # 3 sites x 2 rounds
    arrays = [a for reply in transport.replies for a in protocol.encode(reply)[1].values()]
    fixed = [a for a in arrays if a.dtype == np.uint64]
    assert len(fixed) == 6 and all(looks_uniform(a) > 1e-4 for a in fixed)
    for q in own:  # no array the coordinator received is, or contains, one site's contribution
        for a in arrays:
            assert not (a.shape == q.shape and np.array_equal(a.view(np.uint64), q))


@pytest.mark.slow
def test_a_site_lost_after_masking_leaves_the_simulators_numbers(tmp_path, monkeypatch):
    """Site 1 drops out of round 2 after the masks were fixed: the coordinator rebuilds its pairwise
    masks from the others' shares, and the merged model is the simulator's with that node failing in round 2."""
    from hsl_lightning.federation.training import OneByOne

    config = config_for("fedavg", rounds=2, min_nodes=2, deploy_round="last")  # model.ckpt: round 2's merge
    train = OneByOne.train_trainee

    def failing(self, r, t, *args, **kwargs):
        return RuntimeError("gone") if (r, t) == (1, 1) else train(self, r, t, *args, **kwargs)

    monkeypatch.setattr(OneByOne, "train_trainee", failing)
    sim = simulate(config, tmp_path / "sim")
    monkeypatch.undo()
    text = yaml.safe_dump(config)
    sites = [Vanishing(text, i, tmp_path / "sites" / f"site{i}", **keyed(i)) for i in range(3)]
    transport = LocalSites(sites)
    dep = deploy(config, tmp_path / "dep", transport)
    assert [type(m).__name__ for i, m in transport.sent].count("Recover") == 2  # asked of the two others
    assert list(dep["deployment"]["failed"]) == ["1"]
    assert dep["deployment"]["failed"]["1"].startswith("stopped answering: no reply within 300 s")
    ws, wd = deployed_weights(tmp_path / "sim", sim), deployed_weights(tmp_path / "dep", dep)
    for key in ws["node0"]:
        assert torch.equal(ws["node0"][key], wd["node0"][key]), key
    assert [h["nodes_dropped"] for h in dep["history"]] == [h["nodes_dropped"] for h in sim["history"]] == [0, 1]
    assert dep["best_round"] == sim["best_round"] == 2
    # (the deployed site 1 also missed round 1's validation, which rode on the request it never answered)
    assert math.isnan(dep["history"][0]["node1/val_auc"]) and not math.isnan(sim["history"][0]["node1/val_auc"])
