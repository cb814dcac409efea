"""DP-FedAvg: the clipping bound, the noise's scale, epsilon from Opacus, and no effect when off;
noise no one can regenerate (os.urandom, so a DP run does not repeat), the insecure seeded switch
and where it is refused, and the refusal of DP without secure aggregation."""

import json
import math
from pathlib import Path

import pytest
import torch

from hsl_lightning import ClassifierModule, Federation, HSLError
from hsl_lightning.federation.message import MessageLayout, RoundMessage
from hsl_lightning.federation.privacy import DifferentialPrivacy, PrivateMean, secure_normal
from hsl_lightning.federation.sync import StatePacker

from conftest import tiny_classifier, tiny_data, tiny_hsl


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


def test_the_noise_is_normal_at_its_scale_and_a_fresh_draw_every_time_whatever_the_seed():
    from scipy import stats

    nodes, d, sigma, clip = 4, 100_000, 0.8, 0.5
    zero = [torch.zeros(d) for _ in range(nodes)]
    privacy = DifferentialPrivacy(clip=clip, noise_multiplier=sigma)
    a, b = contributions(zero, privacy, seed=3), contributions(zero, privacy, seed=3)  # the same seed twice
    # Kolmogorov-Smirnov against N(0, (sigma C)^2): a correct source fails it with probability 1e-6,
    # a scale 10 % off fails it (D about 0.02 against a critical 0.0085 at 1e5 draws)
    assert stats.kstest(a.numpy(), "norm", args=(0.0, sigma * clip)).pvalue > 1e-6
    # a sample std over 1e5 normals has a relative standard error of 0.22 %: 1.5 % is 7 of them
    assert float(a.std()) == pytest.approx(sigma * clip, rel=0.015)
    # independent draws: their correlation has standard error 1 / sqrt(d); seeded noise would give 1
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(d)
    z = secure_normal(100_001)  # an odd count, straight from the source
    assert z.shape == (100_001,) and z.dtype == torch.float64
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-6
    assert abs(float(torch.corrcoef(torch.stack([z[:50_000], z[50_000:100_000]]))[0, 1])) < 5 / math.sqrt(50_000)


def test_insecure_seeded_noise_repeats_the_noise_exactly_per_seed():
    privacy = DifferentialPrivacy(clip=0.5, noise_multiplier=0.8, insecure_seeded_noise=True)
    zero = [torch.zeros(1000) for _ in range(3)]
    first = contributions(zero, privacy, seed=3)
    assert float(first.abs().max()) > 0 and torch.equal(first, contributions(zero, privacy, seed=3))
    assert not torch.equal(first, contributions(zero, privacy, seed=4))


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


@pytest.mark.slow
def test_no_noise_and_no_clipping_reproduce_the_run_without_privacy_exactly(tmp_path):
    plain = run(tmp_path, "plain")
    off = run(tmp_path, "off", DifferentialPrivacy(clip=math.inf, noise_multiplier=0.0))
    assert [n["test_auc"] for n in off["nodes"]] == [n["test_auc"] for n in plain["nodes"]]
    assert [h["mean_val_auc"] for h in off["history"]] == [h["mean_val_auc"] for h in plain["history"]]
    a = torch.load(tmp_path / "plain" / "model.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "off" / "model.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
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


def test_privacy_without_secure_aggregation_is_refused_and_says_what_to_set():
    # each site adds sigma / sqrt(N): a coordinator seeing single replies would see N times less noise variance
    with pytest.raises(HSLError, match=r"coordinator sees nothing but the sum.*Set federation.secure_aggregation "
                                       r"to true or null"):
        Federation(privacy=DifferentialPrivacy(), secure_aggregation=False)
    Federation(privacy=DifferentialPrivacy(), secure_aggregation=True)
    Federation(privacy=DifferentialPrivacy())  # None, the default: on for DP runs
    Federation(secure_aggregation=False)  # without DP, off is allowed


@pytest.mark.slow
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


def fedavg_run(tmp_path, name, privacy=None) -> tuple[dict, dict]:
    """A 2-round FedAvg run of the tiny synthetic federation, seed 0: its deployed weights and summary.json."""
    torch.manual_seed(0)
    Federation(strategy="fedavg", rounds=2, run_dir=str(tmp_path / name), wandb="disabled", progress=False,
               checkpoint=False, threads=1, seed=0, privacy=privacy).fit(tiny_classifier(), tiny_data(use_sat=False))
    weights = torch.load(tmp_path / name / "model.ckpt", weights_only=True)["state_dict"]
    return weights, json.loads((tmp_path / name / "summary.json").read_text())


def max_dw(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diffs = [(a[k].double() - b[k].double()).abs().max() for k in a if a[k].numel()]
    assert all(torch.isfinite(d) for d in diffs)
    return float(max(diffs))


def test_two_private_runs_of_one_config_end_with_different_weights_and_two_plain_runs_with_the_same(tmp_path):
    privacy = DifferentialPrivacy(clip=1.0, noise_multiplier=0.01)  # small: the models stay finite
    first, summary = fedavg_run(tmp_path, "dp_a", privacy)
    second, _ = fedavg_run(tmp_path, "dp_b", privacy)
    assert max_dw(first, second) > 0  # the same config and seed, fresh noise
    assert max_dw(*(fedavg_run(tmp_path, name)[0] for name in ("plain_a", "plain_b"))) == 0
    recorded = summary["privacy"]
    assert recorded["noise"] == "os.urandom" and recorded["insecure_seeded_noise"] is False
    assert recorded["holds_against"].startswith("The coordinator, which sees only the masked sum")
    assert "Not the coordinator in league with other sites" in recorded["holds_against"]
    # with the coordinator and both other sites, a site keeps its own share alone: sigma / sqrt(3)
    assert recorded["epsilon_against_coordinator_with_all_other_sites"] == privacy.epsilon(2, 0.01 / math.sqrt(3))
    assert recorded["epsilon_against_coordinator_with_all_other_sites"] > recorded["epsilon"]


@pytest.mark.slow
def test_insecure_seeded_noise_repeats_a_run_warns_and_is_recorded(tmp_path):
    privacy = DifferentialPrivacy(clip=1.0, noise_multiplier=0.01, insecure_seeded_noise=True)
    with pytest.warns(UserWarning, match="insecure_seeded_noise is on: the DP noise is drawn from the run's seed"):
        first, summary = fedavg_run(tmp_path, "a", privacy)
    with pytest.warns(UserWarning, match="insecure_seeded_noise"):
        second, _ = fedavg_run(tmp_path, "b", privacy)
    assert max_dw(first, second) == 0
    assert max_dw(first, fedavg_run(tmp_path, "plain")[0]) > 0  # the noise did act
    assert summary["privacy"]["noise"] == "seeded (insecure)" and summary["privacy"]["insecure_seeded_noise"] is True
    assert summary["privacy"]["holds_against"].startswith("No one who holds the run's seed")


@pytest.mark.slow
def test_a_deployed_site_refuses_insecure_seeded_noise(tmp_path):
    from test_flower import config_for, sites_for

    config = config_for("fedavg", privacy={"clip": 1.0, "noise_multiplier": 0.5, "insecure_seeded_noise": True})
    with pytest.raises(HSLError, match=r"Site site0 refuses federation.privacy.insecure_seeded_noise: .*subtract it"):
        sites_for(config, tmp_path / "sites")
    config["federation"]["privacy"]["insecure_seeded_noise"] = False
    assert len(sites_for(config, tmp_path / "ok")) == 3  # the same config with os.urandom noise is accepted
