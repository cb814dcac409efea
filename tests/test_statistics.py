"""Site statistics: the same in simulation and deployment, a rare bin below the site's minimum suppressed, noise from
the operating system (different in two runs), a site's own stricter floor and salt winning over the run's, a
fingerprint that repeats only with the same data and salt, and the study's figures quoted as the study gave them."""

import json
import re
from pathlib import Path

import pytest
import torch

from hsl_lightning.data.base import ImageSet
from hsl_lightning.data.statistics import STUDY, SiteStatistics, compare, laplace, node_statistics, salt
from hsl_lightning.errors import HSLError

from test_flower import config_for, deploy, keyed, simulate
from hsl_lightning.flower.site import Site

ROOT = Path(__file__).resolve().parents[1]


class OneNode:
    """The least a data module needs for node_statistics: nodes[i] with train/val/test, and a primary source."""

    def __init__(self, train: ImageSet, name="n"):
        empty = ImageSet(train.images[:0], train.labels[:0])
        node = type("Node", (), {"name": name, "split": lambda self, s: {"train": train, "val": empty, "test": empty}[s]})
        self.nodes, self.primary = [node()], object()


def images_with_levels(levels: list[int], per_level: list[int]) -> ImageSet:
    """Flat 8-bit images: per_level[k] images at grey level levels[k]."""
    stack = [torch.full((1, 4, 4), v, dtype=torch.uint8) for v, k in zip(levels, per_level) for _ in range(k)]
    return ImageSet(torch.stack(stack), torch.arange(len(stack)) % 2)


def test_a_bin_from_fewer_images_than_the_minimum_is_suppressed_and_cannot_be_subtracted_out(tmp_path):
    """40 dark, 6 mid-grey and 3 bright images, minimum 5: the bright bin is hidden, and so is the mid bin, since
    otherwise the total minus the shown bins would give the 3 (complementary suppression); the same for the pixel
    shares. With a minimum of 3 all three are shown."""
    data = OneNode(images_with_levels([20, 128, 240], [40, 6, 3]))
    key = salt(tmp_path / "salt")
    strict = node_statistics(data, 0, SiteStatistics(bins=8, min_count=5), key)
    dark, mid, bright = 20 * 8 // 256, 128 * 8 // 256, 240 * 8 // 256
    assert strict["image_means"][dark] == 40 and strict["image_means"][mid] is None and strict["image_means"][bright] is None
    n = sum(c["n"] for c in strict["counts"].values())
    assert n - sum(c for c in strict["image_means"] if c is not None) == 9  # what subtraction gives: 9 >= 5
    shown = [p for p in strict["pixels"] if p is not None]
    assert strict["pixels"][dark] == pytest.approx(40 / 49, abs=1e-4) and len(shown) == 1
    loose = node_statistics(data, 0, SiteStatistics(bins=8, min_count=3), key)
    assert [loose["image_means"][k] for k in (dark, mid, bright)] == [40, 6, 3]
    lone = OneNode(images_with_levels([20, 240], [40, 3]))  # nothing to hide the 3 behind but the 40: all hidden
    assert all(c is None for c in node_statistics(lone, 0, SiteStatistics(bins=8, min_count=5), key)["image_means"])
    few = node_statistics(OneNode(images_with_levels([20], [4])), 0, SiteStatistics(bins=8, min_count=5), key)
    assert few["mean"] is None and few["std"] is None and all(p is None for p in few["pixels"])


def test_noise_never_lets_a_small_bin_through(tmp_path):
    """Suppression is decided on exact counts: with noise far larger than the minimum, a bin of 2 images is never
    shown, and a shown count is noised."""
    data = OneNode(images_with_levels([20, 128, 240], [40, 30, 2]))
    rules, key = SiteStatistics(bins=8, min_count=5, noise=20.0), salt(tmp_path / "salt")
    bright = 240 * 8 // 256
    draws = [node_statistics(data, 0, rules, key)["image_means"] for _ in range(40)]
    assert all(d[bright] is None for d in draws)
    assert len({d[20 * 8 // 256] for d in draws}) > 1


def test_noise_comes_from_the_operating_system_and_differs_between_two_runs(tmp_path):
    data = OneNode(images_with_levels([20, 240], [400, 300]))
    rules, key = SiteStatistics(bins=4, min_count=1, noise=5.0), salt(tmp_path / "salt")
    torch.manual_seed(0)
    first = node_statistics(data, 0, rules, key)["image_means"]
    torch.manual_seed(0)  # the run's seed does not decide the noise
    second = node_statistics(data, 0, rules, key)["image_means"]
    assert first != second
    draws = laplace(20000, 2.0)
    assert abs(float(draws.mean())) < 0.1 and float(draws.abs().mean()) == pytest.approx(2.0, rel=0.05)


def test_the_fingerprint_repeats_with_the_same_data_and_salt_only(tmp_path):
    data = OneNode(images_with_levels([20, 240], [10, 10]))
    rules = SiteStatistics(bins=4, min_count=1)
    one = node_statistics(data, 0, rules, salt(tmp_path / "a"))["fingerprint"]
    assert node_statistics(data, 0, rules, salt(tmp_path / "a"))["fingerprint"] == one
    assert node_statistics(data, 0, rules, salt(tmp_path / "b"))["fingerprint"] != one  # another salt
    changed = OneNode(images_with_levels([20, 240], [10, 9]))
    assert node_statistics(changed, 0, rules, salt(tmp_path / "a"))["fingerprint"] != one
    assert len((tmp_path / "a").read_bytes()) == 32 and (tmp_path / "a").stat().st_mode & 0o077 == 0


def test_rules_are_checked_and_a_sites_floor_wins():
    with pytest.raises(HSLError, match="min_count"):
        SiteStatistics(min_count=0)
    rules = SiteStatistics(min_count=5, noise=0.0, salt_file="/coordinator/chose/this")
    site = rules.stricter(min_count=20, noise=1.5, salt_file="/site/own")
    assert (site.min_count, site.noise, site.salt_file) == (20, 1.5, "/site/own")
    assert rules.stricter(min_count=2, noise=None, salt_file="/site/own").min_count == 5


def test_the_same_statistics_in_simulation_and_deployment(tmp_path):
    """Quickstart-like synthetic sites: every site's row (counts, sizes, histograms, mean, fingerprint) is the same
    whether the simulator or the deployed sites compute it, and so is the comparison; a site's own larger minimum
    suppresses more of its own row only."""
    config = config_for("fedavg", rounds=1, statistics={"bins": 16, "min_count": 5,
                                                        "salt_file": str(tmp_path / "salt")})
    simulate(config, tmp_path / "sim")
    text = __import__("yaml").safe_dump(config)
    floor = {"fingerprint-salt": str(tmp_path / "salt")}
    sites = [Site(text, i, tmp_path / f"site{i}" / "run", statistics=floor, **keyed(i)) for i in range(3)]
    deploy(config, tmp_path / "dep", sites)
    sim = json.loads((tmp_path / "sim" / "statistics.json").read_text())
    dep = json.loads((tmp_path / "dep" / "statistics.json").read_text())
    assert sim == dep
    from hsl_lightning.data.statistics import format_comparison

    printed = format_comparison(sim["sites"], sim["comparison"])  # what the coordinator prints
    assert all(name in printed for name in ("node0", "node1", "node2", "Label-prior shift", "Intensity", "Quantity skew"))
    assert [r["counts"]["train"]["n"] for r in sim["sites"]] == [
        n["n_train"] for n in json.loads((tmp_path / "sim" / "summary.json").read_text())["nodes"]]
    summary = json.loads((tmp_path / "dep" / "summary.json").read_text())
    assert summary["statistics"]["fingerprints"] == {r["name"]: r["fingerprint"] for r in sim["sites"]}
    # a site that sets its own, larger minimum shows less; the coordinator cannot lower it
    strict = Site(text, 1, tmp_path / "strict" / "run", statistics={**floor, "stats-min-count": "60"}, **keyed(1))
    mine = strict._statistics()
    assert mine["min_count"] == 60 and sum(c is None for c in mine["image_means"]) > sum(
        c is None for c in sim["sites"][1]["image_means"])


def test_the_comparison_names_the_three_kinds_of_shift():
    row = lambda name, n, pos, shares, mean: {"name": name, "counts": {"train": {"n": n, "positives": pos}},  # noqa: E731
                                              "pixels": shares, "mean": mean}
    rows = [row("a", 100, 10, [0.5, 0.5, None], 0.4), row("b", 20, 18, [0.1, 0.9, 0.0], 0.6)]
    out = compare(rows)
    assert out["label_prior_shift"]["spread"] == pytest.approx(0.8)
    assert out["quantity_skew"]["ratio"] == pytest.approx(5.0)
    assert out["intensity_shift"]["largest_tv_distance"] == pytest.approx(0.4)  # over the two bins both show
    assert out["intensity_shift"]["between"] == ["a", "b"]


def test_the_study_is_quoted_as_its_report_gives_it():
    """Every figure the comparison quotes from the heterogeneity study is in the study's report."""
    report = (ROOT / "benchmarks" / "results" / "heterogeneity_powered" / "report.md").read_text()
    for kind, text in STUDY.items():
        for figure in re.findall(r"\b0\.\d{3}\b", text):
            assert figure in report, f"{kind}: {figure} is not in the study's report"
