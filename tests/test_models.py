import pytest
import timm
import torch

from hsl_lightning import HSLError
from hsl_lightning.models import HSLNetwork, MMoE, create_backbone


def test_mmoe_outputs_one_mixture_and_one_gate_per_task():
    mmoe = MMoE(in_features=20, num_experts=5, expert_hidden=7, expert_dim=3, num_tasks=2)
    mixed, gates = mmoe(torch.rand(4, 20))
    assert [m.shape for m in mixed] == [torch.Size([4, 3])] * 2
    assert [g.shape for g in gates] == [torch.Size([4, 5])] * 2


def test_gates_are_distributions_over_experts():
    net = HSLNetwork(backbone="resnet18", num_experts=12).eval()
    out = net(torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28))
    for g in out.gates:
        assert torch.allclose(g.sum(dim=1), torch.ones(6), atol=1e-6)
        assert (g >= 0).all()
    assert out.primary_logit.shape == out.sat_logit.shape == (6,)


def test_mixture_is_the_gate_weighted_sum_of_experts():
    mmoe = MMoE(in_features=8, num_experts=3, expert_hidden=5, expert_dim=2, num_tasks=1).eval()
    h = torch.rand(2, 8)
    (mixed,), (gate,) = mmoe(h)
    by_hand = sum(gate[:, e:e + 1] * mmoe.experts[e](h) for e in range(3))
    assert torch.allclose(mixed, by_hand, atol=1e-6)


def test_reference_configuration_has_about_23_7_million_parameters():
    n = sum(p.numel() for p in HSLNetwork(backbone="resnet18").parameters())
    assert abs(n - 23.7e6) / 23.7e6 < 0.01, n


def test_shared_encoder_holds_one_trunk():
    two = sum(p.numel() for p in HSLNetwork(backbone="resnet18").parameters())
    one_net = HSLNetwork(backbone="resnet18", shared_encoder=True)
    one = sum(p.numel() for p in one_net.parameters())
    trunk = sum(p.numel() for p in one_net.primary_encoder.parameters())
    assert two - one == trunk
    assert not any(k.startswith("sat_encoder") for k in one_net.state_dict())


def test_every_reference_number_is_a_parameter():
    net = HSLNetwork(backbone="resnet18", proj_dim=16, skip_dim=4, num_experts=3, expert_hidden=5,
                     tower_hidden=6, temperature=2.0)
    assert len(net.mmoe.experts) == 3 and net.mmoe.experts[0][0].in_features == 32
    assert net.primary_skip.out_features == 4 and net.primary_tower[0].out_features == 6
    assert net.temperature == 2.0


def test_unknown_backbone_names_close_matches():
    with pytest.raises(HSLError, match="resnet18"):
        create_backbone("resnet-18")


def test_backbone_loads_a_local_weights_file(tmp_path):
    source = timm.create_model("resnet18", num_classes=0, in_chans=1)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("resnet18", in_chans=1, weights=str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.trunk.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(HSLError, match="not found"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))


def test_wrong_channel_count_is_a_clear_error():
    net = create_backbone("resnet18", in_chans=1)
    with pytest.raises(HSLError, match="in_chans"):
        net(torch.rand(2, 3, 28, 28))


def test_shared_bottom_ablation_replaces_experts_and_gates():
    net = HSLNetwork(backbone="test_resnet", proj_dim=16, num_experts=4, expert_hidden=8, mixture="shared_bottom")
    assert not any("gates" in k or "experts" in k for k in net.state_dict())
    out = net(torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28))
    assert out.primary_logit.shape == out.sat_logit.shape == (3,)
    hidden = net.mmoe.bottom[0].out_features
    assert hidden == 4 * 8  # as many hidden units as all experts together
    with pytest.raises(HSLError, match="mixture must be one of mmoe, shared_bottom"):
        HSLNetwork(backbone="test_resnet", mixture="moe")


@pytest.mark.parametrize("embedding", ["softmax", "identity"])
def test_embedding_in_front_of_the_experts(embedding):
    net = HSLNetwork(backbone="test_resnet", proj_dim=16, num_experts=4, expert_hidden=8, embedding=embedding).eval()
    seen = {}
    net.mmoe.register_forward_pre_hook(lambda module, args: seen.update(h=args[0]))
    primary, sat = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    net(primary, sat)
    raw = torch.cat([net.primary_proj(net.primary_encoder(primary)), net.sat_features(sat)], dim=1)
    expected = torch.softmax(raw / net.temperature, dim=1) if embedding == "softmax" else raw
    assert torch.allclose(seen["h"], expected, atol=1e-6)


def test_unknown_embedding_is_refused():
    with pytest.raises(HSLError, match="embedding must be softmax or identity"):
        HSLNetwork(backbone="test_resnet", embedding="tanh")
