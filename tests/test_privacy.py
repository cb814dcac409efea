"""Privacy audit: what crosses an institution's boundary at synchronisation is model or strategy
state (weighted and summed) and counters, never anything computed from a batch directly."""

import pytest
import torch

from hsl_lightning import ClassifierModule, Federation, FoundationProbe, SplitClassifier
from hsl_lightning.federation import federation as federation_module
from hsl_lightning.federation.strategies import STRATEGIES, get_strategy
from hsl_lightning.federation.sync import StatePacker

from conftest import tiny_data, tiny_hsl


def model_and_data(name):
    if name == "hsl":
        return tiny_hsl(), tiny_data()
    if name == "foundation":
        return FoundationProbe(backbone="test_vit", in_chans=1, pretrained=False), tiny_data(use_sat=False, image_size=32)
    if name == "splitavg":
        return SplitClassifier(backbone="test_resnet"), tiny_data(use_sat=False)
    return ClassifierModule(backbone="test_resnet"), tiny_data(use_sat=False)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_synchronisation_sends_only_state(tmp_path, monkeypatch, name):
    sent, contributions = [], []
    reduce, train_local = federation_module.all_reduce_sum, Federation._train_local

    def spy_reduce(fabric, vector):
        sent.append(vector.detach().clone())
        return reduce(fabric, vector)

    def spy_train(self, fabric, module, dm, nodes, names, r, t, personal=False, **kwargs):
        out = train_local(self, fabric, module, dm, nodes, names, r, t, personal, **kwargs)
        if not personal:  # what the node contributes: its state and its strategy vector
            contributions.append((t, {k: v.detach().clone() for k, v in out[0].items()}, out[2]))
        return out

    monkeypatch.setattr(federation_module, "all_reduce_sum", spy_reduce)
    monkeypatch.setattr(Federation, "_train_local", spy_train)
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
    n_extra = strategy.extra_size(model)
    plan = strategy.plan(3)
    sizes = [sum(len(data.nodes[i].train) for i in nodes) for nodes in plan]
    # rebuild the round's message from the contributions alone: it must match bit for bit
    expected = torch.zeros(packer.numel + n_extra + 2 + len(plan), dtype=torch.float64)
    for t, state, extra in contributions:
        w = federation.strategy.weight(sizes[t])
        expected[:packer.numel] += w * packer.pack(state)
        if extra is not None:
            expected[packer.numel:packer.numel + n_extra] += extra
        expected[packer.numel + n_extra + 1 + t] = 1  # this node finished the round
        expected[-1] += w
    message = sent[0]
    traffic = message[packer.numel + n_extra]  # SplitAVG's declared feature-map bytes, else 0
    expected[packer.numel + n_extra] = traffic
    assert torch.equal(message, expected)
    assert (traffic > 0) == (name == "splitavg")
    if name == "scaffold":  # its extra vector is parameter-shaped: the control-variate update
        assert n_extra == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if federation.strategy.server_aggregates:  # FedCOME: the server also sees each node's state, nothing else
        stacked = sent[1]
        assert stacked.shape == (len(plan), packer.numel)
        for t, state, _ in contributions:
            assert torch.equal(stacked[t], packer.pack(state))
    else:
        assert len(sent) == 1  # one message per round
