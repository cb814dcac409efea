"""DP-FedAvg: the clipping bound, the noise's scale, epsilon from Opacus, and no effect when off."""

import json
import math
from pathlib import Path

import pytest
import torch

from hsl_lightning import ClassifierModule, Federation, HSLError
from hsl_lightning.federation.message import MessageLayout, RoundMessage
from hsl_lightning.federation.privacy import DifferentialPrivacy, PrivateMean
from hsl_lightning.federation.sync import StatePacker

from conftest import tiny_data, tiny_hsl


class FakeRun:
    """What a merge reads of a rank: the packer and the plan of trainees."""

    def __init__(self, state: dict, trainees: int):
        self.packer = StatePacker(state, list(state))
        self.plan = [(i,) for i in range(trainees)]
        self.strategy = None


def contributions(updates: list[torch.Tensor], privacy: DifferentialPrivacy, seed: int = 0) -> torch.Tensor:
    """The summed message of trainees whose states are ``received + update``."""
    d = updates[0].numel()
    received = torch.zeros(d, dtype=torch.float64)
    run = FakeRun({"w": torch.zeros(d)}, len(updates))
    merge = PrivateMean(run, received, privacy, seed)
    message = RoundMessage(MessageLayout(d, 0, len(updates)))
    for t, update in enumerate(updates):
        merge.contribute(message, t, {"w": update.float()}, 1.0)
    return message.state.clone()


def test_each_update_is_clipped_to_the_bound_and_small_ones_pass_unchanged():
    big, small = torch.full((100,), 3.0), torch.full((100,), 0.01)  # norms 30 and 0.1
    total = contributions([big], DifferentialPrivacy(clip=2.0, noise_multiplier=0.0))
    assert float(total.norm()) == pytest.approx(2.0, rel=1e-12)
    assert torch.allclose(total / total.norm(), big.double() / big.double().norm())  # direction kept
    assert torch.equal(contributions([small], DifferentialPrivacy(clip=2.0, noise_multiplier=0.0)), small.double())


def test_the_noise_in_the_sum_has_standard_deviation_sigma_times_clip():
    nodes, d, sigma, clip = 4, 250_000, 0.8, 0.5
    zero = [torch.zeros(d) for _ in range(nodes)]
    total = contributions(zero, DifferentialPrivacy(clip=clip, noise_multiplier=sigma), seed=3)
    # the sample std of 250,000 normals lies within 1 % of the truth with overwhelming probability
    assert float(total.std()) == pytest.approx(sigma * clip, rel=0.01)
    assert abs(float(total.mean())) < 5 * sigma * clip / math.sqrt(d)
    one = contributions(zero[:1], DifferentialPrivacy(clip=clip, noise_multiplier=sigma), seed=3)
    assert float(one.std()) == pytest.approx(sigma * clip, rel=0.01)  # alone, a node adds all of it


def test_epsilon_is_opacus_for_the_same_sigma_sampling_rate_and_steps():
    from opacus.accountants import RDPAccountant

    privacy = DifferentialPrivacy(clip=1.0, noise_multiplier=1.1, delta=1e-5)
    accountant = RDPAccountant()
    for _ in range(7):
        accountant.step(noise_multiplier=1.1, sample_rate=1.0)
    assert privacy.epsilon(7) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert privacy.epsilon(0) == 0 and DifferentialPrivacy(noise_multiplier=0.0).epsilon(3) == math.inf


def run(tmp_path, name, privacy=None, rounds=2):
    torch.manual_seed(0)
    return Federation(strategy="hsl", rounds=rounds, run_dir=str(tmp_path / name), wandb="disabled", progress=False,
                      checkpoint=False, threads=1, privacy=privacy).fit(tiny_hsl(), tiny_data())


def test_no_noise_and_no_clipping_reproduce_the_run_without_privacy_exactly(tmp_path):
    plain = run(tmp_path, "plain")
    off = run(tmp_path, "off", DifferentialPrivacy(clip=math.inf, noise_multiplier=0.0))
    assert [n["test_auc"] for n in off["nodes"]] == [n["test_auc"] for n in plain["nodes"]]
    assert [h["mean_val_auc"] for h in off["history"]] == [h["mean_val_auc"] for h in plain["history"]]
    a = torch.load(tmp_path / "plain" / "model.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "off" / "model.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_private_run_logs_epsilon_every_round_and_in_the_summary(tmp_path):
    privacy = DifferentialPrivacy(clip=1.0, noise_multiplier=1.0)
    summary = run(tmp_path, "dp", privacy, rounds=2)
    assert [h["dp_epsilon"] for h in summary["history"]] == [privacy.epsilon(1), privacy.epsilon(2)]
    on_disk = json.loads((tmp_path / "dp" / "summary.json").read_text())["privacy"]
    assert on_disk["epsilon"] == privacy.epsilon(2) and on_disk["clip"] == 1.0 and on_disk["accountant"] == "rdp"
    plain = run(tmp_path, "plain")
    assert [n["test_auc"] for n in summary["nodes"]] != [n["test_auc"] for n in plain["nodes"]]  # noise did act


@pytest.mark.parametrize("strategy, why", [("local", "nothing is shared"), ("ditto", "a model of its own"),
                                           ("fedcome", "not a mean"), ("scaffold", "control variates")])
def test_strategies_whose_message_is_not_a_mean_of_states_are_refused(tmp_path, strategy, why):
    model = ClassifierModule(backbone="test_resnet", optimizer="sgd", weight_decay=0.0)
    with pytest.raises(HSLError, match=why):
        Federation(strategy=strategy, rounds=1, run_dir=str(tmp_path), wandb="disabled", progress=False,
                   privacy=DifferentialPrivacy()).fit(model, tiny_data(use_sat=False))


def test_bad_privacy_settings_are_clear_errors():
    with pytest.raises(HSLError, match="clip must be positive"):
        DifferentialPrivacy(clip=0)
    with pytest.raises(HSLError, match="accountant must be one of"):
        DifferentialPrivacy(accountant="moments")
    with pytest.raises(HSLError, match="min_nodes"):
        Federation(privacy=DifferentialPrivacy(), min_nodes=2)


def test_update_norms_before_clipping_are_logged_to_choose_the_clip_by(tmp_path):
    free = run(tmp_path, "free", DifferentialPrivacy(clip=math.inf, noise_multiplier=0.0), rounds=1)["history"][0]
    assert free["dp_clipped_share"] == 0.0 and 0 < free["dp_update_norm_median"] <= free["dp_update_norm_max"]
    # clipped at round 1's median norm: the same updates (same start, no noise), one of three above it
    clipped = run(tmp_path, "clipped", DifferentialPrivacy(clip=free["dp_update_norm_median"], noise_multiplier=0.0),
                  rounds=1)["history"][0]
    assert clipped["dp_update_norm_median"] == free["dp_update_norm_median"]
    assert clipped["dp_clipped_share"] == pytest.approx(1 / 3)


def test_clip_inf_is_accepted_as_a_command_line_gives_it(capsys):
    from hsl_lightning.cli import main

    assert DifferentialPrivacy(clip="inf").clip == math.inf
    with pytest.raises(HSLError, match="positive number or inf, got 'big'"):
        DifferentialPrivacy(clip="big")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"),
              "--federation.privacy.clip", "inf", "--federation.privacy.noise_multiplier", "0", "--print_config"])
    assert "clip: inf" in capsys.readouterr().out
