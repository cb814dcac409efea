"""Privacy audit: what crosses an institution's boundary at synchronisation is model or strategy
state (weighted and summed) and counters, never anything computed from a batch directly."""

import json

import pytest
import torch

from hsl_lightning import Federation, FoundationProbe, SplitClassifier
from hsl_lightning.federation import fixedpoint, sync
from hsl_lightning.federation.merge import Server
from hsl_lightning.federation.message import MessageLayout, RoundMessage
from hsl_lightning.federation.strategies import STRATEGIES, get_strategy
from hsl_lightning.federation.sync import StatePacker
from hsl_lightning.federation.training import OneByOne

from conftest import tiny_classifier, tiny_data, tiny_hsl


def model_and_data(name):
    if name == "hsl":
        return tiny_hsl(), tiny_data()
    if name == "foundation":
        return FoundationProbe(backbone="test_vit", in_chans=1, pretrained=False), tiny_data(use_sat=False, image_size=32)
    if name == "splitavg":
        return SplitClassifier(backbone="test_resnet"), tiny_data(use_sat=False)
    return tiny_classifier(name), tiny_data(use_sat=False)


@pytest.mark.parametrize("name", [n if n in ("hsl", "fedavg", "scaffold", "fedcome", "splitavg") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(STRATEGIES)])
def test_synchronisation_sends_only_state(tmp_path, monkeypatch, name):
    sent, contributions = [], []
    reduce, train_local = sync.all_reduce_sum, OneByOne.train_local

    def spy_reduce(fabric, vector):
        sent.append(vector.detach().clone())
        return reduce(fabric, vector)

    def spy_train(self, r, t, personal=False, **kwargs):
        out = train_local(self, r, t, personal, **kwargs)
        if not personal:  # what the node contributes: its state and its strategy vector
            contributions.append((t, {k: v.detach().clone() for k, v in out[0].items()}, out[2]))
        return out

    monkeypatch.setattr(sync, "all_reduce_sum", spy_reduce)
    monkeypatch.setattr(OneByOne, "train_local", spy_train)
    torch.manual_seed(0)
    model, data = model_and_data(name)
    epochs = 2 if name == "fedrep" else 1
    federation = Federation(strategy=name, rounds=1, local_epochs=epochs, run_dir=str(tmp_path), wandb="disabled",
                            progress=False, checkpoint=False)
    federation.fit(model, data)

    strategy = get_strategy(name)
    state_keys = set(model.state_dict())
    shared = federation.strategy.shared_keys(model)
    assert set(shared) <= state_keys  # only entries of the model's state are shared
    packer = StatePacker(model.state_dict(), shared)
    plan = strategy.plan(3)
    layout = MessageLayout(state=packer.numel, extras=strategy.extra_size(model), trainees=len(plan))
    sizes = [sum(len(data.nodes[i].train) for i in nodes) for nodes in plan]
    # rebuild the round's message from the contributions alone: it must match bit for bit
    secure = fixedpoint.resolve(None, federation.strategy, len(plan), packer.numel)
    if secure:  # secure aggregation: each contribution's own fixed-point integers, weights normalised
        total_weight = sum(federation.strategy.weight(n) for n in sizes)
        expected_fixed = torch.zeros(layout.size, dtype=torch.int64)
        for t, state, extra in contributions:
            own = RoundMessage(layout)
            own.state.add_(packer.pack(state), alpha=federation.strategy.weight(sizes[t]) / total_weight)
            own.add(t, federation.strategy.weight(sizes[t]) / total_weight, extra)
            expected_fixed += fixedpoint.quantise(own.vector, len(plan), "a node", 1)
        assert sent[0].dtype == torch.int64 and torch.equal(sent[0], expected_fixed)
        message = RoundMessage.from_fixed(layout, sent[0], 1)
    else:
        message = RoundMessage(layout, vector=sent[0])
        expected = RoundMessage(layout)
        for t, state, extra in contributions:
            w = federation.strategy.weight(sizes[t])
            expected.state.add_(packer.pack(state), alpha=w)
            if extra is not None:
                expected.extras.add_(extra)
            expected.finished[t] = 1  # this node finished the round
            expected.weight.add_(w)
        expected.traffic.fill_(message.traffic)  # SplitAVG's declared feature-map bytes, else 0
        assert torch.equal(message.vector, expected.vector)
    assert (message.traffic > 0) == (name == "splitavg")
    if name == "scaffold":  # its extra vector is parameter-shaped: the control-variate update
        assert layout.extras == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if federation.strategy.merge_kind is Server:
        # FedCOME's server merge also sees each node's state, nothing else
        stacked = sent[1]
        assert stacked.shape == (len(plan), packer.numel)
        for t, state, _ in contributions:
            assert torch.equal(stacked[t], packer.pack(state))
        assert len(sent) == 2
    else:
        assert len(sent) == 1  # one message per round


def test_the_message_parts_are_named_views_of_one_vector():
    layout = MessageLayout(state=4, extras=2, trainees=3)
    message = RoundMessage(layout)
    assert layout.size == message.vector.numel() == 4 + 2 + 1 + 3 + 1
    message.state.fill_(1)
    message.extras.fill_(2)
    message.traffic.fill_(3)
    message.add(trainee=1, weight=5.0)
    assert message.vector.tolist() == [1, 1, 1, 1, 2, 2, 3, 0, 1, 0, 5]
    with pytest.raises(ValueError, match="11 entries"):
        RoundMessage(layout, vector=torch.zeros(10, dtype=torch.float64))


@pytest.mark.slow
def test_a_flower_reply_is_exactly_its_part_of_the_simulators_message(tmp_path, monkeypatch):
    """A deployed site's reply to round 1, as the Flower message carries it, holds its part of the
    round's message and aggregates only; the sites' parts add up to the simulator's message bit for bit."""
    from hsl_lightning.flower import protocol
    from hsl_lightning.flower.app import decode, encode
    from hsl_lightning.flower.site import compact, expand_message
    from test_flower import config_for, simulate, sites_for

    config = config_for("scaffold", secure_aggregation=False)  # a strategy vector travels too; unmasked here
    # (with secure aggregation the reply is masked: tests/test_secagg.py)
    sent, reduce = [], sync.all_reduce_sum
    monkeypatch.setattr(sync, "all_reduce_sum", lambda fabric, v: sent.append(v.detach().clone()) or reduce(fabric, v))
    simulate(config, tmp_path / "sim")
    monkeypatch.undo()
    sites = sites_for(config, tmp_path / "sites")
    run = sites[0].run
    merged = run.packer.pack(run.module.state_dict())  # round 1 starts from the template, the same at every site
    total = torch.zeros(run.layout.size, dtype=torch.float64)
    for site in sites:
        request = decode(encode(protocol.Round(0, compact(merged), validate=False, train=True)))
        reply = decode(encode(site.handle(request)))
        header, arrays = protocol.encode(reply)
        assert set(arrays) == {"state", "tail"}
        assert len(reply.state) == run.packer.numel and len(reply.tail) == run.layout.size - run.packer.numel
        fields = {k for k, v in json.loads(header).items() if v is not None}
        assert fields <= {"kind", "version", "node", "completed", "weight", "loss", "train_s", "busy_s", "mask_s"}
        assert reply.val is None and reply.vector is None  # no per-image output, no validation asked
        assert reply.weight == site.run.weight(site.node)  # the strategy's weight of its image count
        expand_message(reply, total, run.packer.numel)
    assert torch.equal(total, sent[0])
