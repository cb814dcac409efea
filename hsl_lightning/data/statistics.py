"""Site statistics before training: how the sites' data differ, without showing any image or rare value.

Each site computes, for each node it holds, from every image of the node (train, val and test) after
the transform training uses (scaling, resizing, the simulated scanner; no augmentation):

- **class counts** per split (the run's data report already carries them: nothing new);
- **image sizes** as stored in the files (file sources) or as built;
- **intensity**: a histogram of each image's mean intensity (``bins`` bins over [0, 1], counts of
  images) and a histogram of all pixels (the share of pixels per bin), with the mean and standard
  deviation of the pixels;
- a **fingerprint**: HMAC-SHA256, keyed by a salt the site keeps secret, over the hashes of its
  images and labels. The same data with the same salt gives the same fingerprint, so a later run can
  show it trained on the same data; without the salt nobody can test whether a site holds a known
  data set.

What leaves the site is limited by two rules the site sets (in a deployment the stricter of the
run's and the site's own node config, ``stats-min-count`` and ``stats-noise``):

- **minimum count**: a histogram bin (or image size) counted from fewer than ``min_count`` images is
  suppressed (``None``; a suppressed size is not even named, only ``other``), and so is the pixel
  histogram's bin that fewer than ``min_count`` images reach. Because the totals are known (class
  counts travel anyway), suppression is completed: while the hidden bins together hold between 1 and
  ``min_count - 1`` images (what subtracting the shown bins from the total would reveal), the
  smallest shown bin is hidden too. Shares are rounded to 4 decimals, mean and deviation to 3, and
  given only for at least ``min_count`` images;
- **noise** (optional): Laplace noise of scale ``noise`` (drawn from ``os.urandom``, never from the
  run's seed) on every count shown; what is shown is decided on the exact counts, so noise never
  lets a small bin through.

:func:`compare` sets the sites side by side in the terms of the library's heterogeneity study:
label-prior shift, intensity (scanner) shift and quantity skew, each with what the study found under
that kind of heterogeneity (:data:`STUDY`), and nothing it did not show.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from hsl_lightning.data.base import SPLITS, unit
from hsl_lightning.errors import HSLError
from hsl_lightning.secure_random import secure_uniform

SALT_BYTES = 32

# What the powered heterogeneity study found (docs/study.md; benchmarks/results/heterogeneity_powered/report.md:
# pool test AUC over 11 complete seeds, Holm-corrected four-outcome verdicts). Its scenarios: label skew = node
# prevalences 0.1 and 0.9, quantity skew = one node 80x another, feature skew = simulated scanners at strength 0.7;
# methods hsl, fedavg, fedprox, moon against the references local and central. tests/test_statistics.py checks every
# figure below against the report.
STUDY = {
    "label": ("Under label skew (BreastMNIST, prevalences 0.1 / 0.9) the study could not tell HSL from FedAvg, FedProx "
              "or MOON (all undetermined; minimum detectable difference 0.081 to 0.102 AUC). Mean pool test AUC: "
              "FedAvg 0.768, MOON 0.736, HSL 0.712, FedProx 0.688; training alone (local) 0.714, pooled data "
              "(central) 0.835."),
    "intensity": ("Under scanner (feature) skew the study could not tell HSL from FedAvg, FedProx or MOON on "
                  "BreastMNIST (undetermined); with PneumoniaMNIST as the primary task HSL was equivalent to FedAvg "
                  "and MOON within +-0.02 AUC and better than FedProx by less than 0.02. Training alone (local) was "
                  "lowest: 0.673 against 0.769 to 0.779 (BreastMNIST)."),
    "quantity": ("Under quantity skew (BreastMNIST, one node 80x another) the study could not tell HSL from FedAvg, "
                 "FedProx or MOON (undetermined; HSL 0.818, FedAvg 0.846, FedProx 0.847, MOON 0.832); training alone "
                 "(local) 0.694."),
}
STUDY_SETTINGS = {"label": 0.8, "quantity": 80.0}  # the study's prevalence spread and size ratio


@dataclass
class SiteStatistics:
    """The run's rules for site statistics (``federation.statistics``; ``null``: none computed).

    Args:
        bins: histogram bins over intensity [0, 1].
        min_count: a bin counted from fewer images is suppressed (a site may ask for more, never less).
        noise: Laplace noise scale added to every image count (0: none; a site may ask for more).
        salt_file: where the fingerprint's secret salt is kept (made from ``os.urandom`` on first use); a
            deployed site uses its own (``site-dir/fingerprint.salt``, or node config ``fingerprint-salt``).
            Default ``~/.cache/hsl_lightning/fingerprint.salt``.
    """

    bins: int = 32
    min_count: int = 10
    noise: float = 0.0
    salt_file: str | None = None

    def __post_init__(self):
        if not (isinstance(self.bins, int) and 2 <= self.bins <= 1024):
            raise HSLError(f"statistics.bins must be 2 to 1024, got {self.bins!r}.")
        if not (isinstance(self.min_count, int) and self.min_count >= 1):
            raise HSLError(f"statistics.min_count must be a whole number of images, at least 1, got {self.min_count!r}.")
        if not self.noise >= 0:
            raise HSLError(f"statistics.noise must be >= 0, got {self.noise!r}.")

    def stricter(self, min_count: int | None = None, noise: float | None = None, salt_file: str | None = None):
        """These rules, with a site's own floor applied (the larger minimum and noise win) and its own salt."""
        return SiteStatistics(self.bins, max(self.min_count, int(min_count or 0)), max(self.noise, float(noise or 0)),
                              salt_file or self.salt_file)


def salt(path: str | os.PathLike | None) -> bytes:
    """The site's secret fingerprint salt, made from ``os.urandom`` (owner-only file) on first use."""
    path = Path(path or "~/.cache/hsl_lightning/fingerprint.salt").expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, fresh = tempfile.mkstemp(dir=path.parent, prefix=".salt-")  # owner-only, written whole before it counts
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(SALT_BYTES))
        try:
            os.link(fresh, path)  # two processes making it at once: the first link wins, both read that one
        except FileExistsError:
            pass
        finally:
            os.unlink(fresh)
    key = path.read_bytes()
    if len(key) < 16:
        raise HSLError(f"The fingerprint salt {path} holds {len(key)} bytes; remove it to make a new one.")
    return key


def laplace(n: int, scale: float) -> torch.Tensor:
    """``n`` Laplace draws of ``scale`` from ``os.urandom``: ``scale`` times the difference of two exponentials,
    -log(1 - u) with u uniform in [0, 1) (:func:`~hsl_lightning.secure_random.secure_uniform`), always finite."""
    u = secure_uniform(2 * n)
    return scale * (u[n:].neg().log1p_() - u[:n].neg().log1p_())


def node_statistics(dm, i: int, rules: SiteStatistics, key: bytes) -> dict:
    """One node's statistics under ``rules`` (see the module docstring); ``key``: the site's salt."""
    node = dm.nodes[i]
    sets = [node.split(s) for s in SPLITS]
    images = torch.cat([s.images for s in sets])
    n, bins = len(images), rules.bins
    x = unit(images).flatten(1)
    means = x.mean(1)
    image_hist = torch.histc(means, bins=bins, min=0, max=1).to(torch.float64)
    pixel_hist = torch.zeros(bins, dtype=torch.float64)
    presence = torch.zeros(n, bins, dtype=torch.bool)  # which bins each image has a pixel in
    for start in range(0, n, 256):
        chunk = x[start: start + 256]
        index = (chunk * bins).long().clamp_(0, bins - 1)
        per_image = torch.zeros(len(chunk), bins, dtype=torch.float64).scatter_add_(
            1, index, torch.ones_like(index, dtype=torch.float64))
        pixel_hist += per_image.sum(0)
        presence[start: start + len(chunk)] = per_image > 0
    sizes = Counter()
    facts = getattr(dm.primary, "facts", {}).get(node.name)
    if facts:
        for split in facts.values():
            sizes.update(split.get("sizes", {}))
    else:
        sizes[f"{images.shape[-1]}x{images.shape[-2]}"] = n
    m = rules.min_count
    enough = n >= m
    # what is shown is decided on exact counts (noise never lets a small bin through), then completed so that
    # the hidden part, which anyone can get by subtraction from the totals, is empty or holds at least m images
    shown_means = _complete([int(c) for c in image_hist.tolist()], m)
    shown_pixels = _complete_pixels(presence, m) if enough else [False] * bins
    size_keys = list(sizes)
    shown_sizes = _complete([sizes[k] for k in size_keys], m)
    noisy = (lambda v: max(0, int(round(v + float(laplace(1, rules.noise)[0]))))) if rules.noise > 0 else int  # noqa: E731
    shares = (pixel_hist / max(float(pixel_hist.sum()), 1.0)).tolist()
    hidden_sizes = sum(sizes[k] for k, keep in zip(size_keys, shown_sizes) if not keep)
    return {
        "name": node.name,
        "counts": {s: {"n": len(d), "positives": d.positives} for s, d in zip(SPLITS, sets)},
        "sizes": {**{k: noisy(sizes[k]) for k, keep in zip(size_keys, shown_sizes) if keep},
                  **({"other": None} if hidden_sizes else {})},
        "stored_as": str(images.dtype).replace("torch.", ""),
        "image_means": [noisy(c) if keep else None for c, keep in zip(image_hist.tolist(), shown_means)],
        "pixels": [round(v, 4) if keep else None for v, keep in zip(shares, shown_pixels)],
        "mean": round(float(x.double().mean()), 3) if enough else None,  # float64 and rounded: the same at a site
        "std": round(float(x.double().std()), 3) if enough else None,  # as in the simulator, whatever its threads
        "fingerprint": fingerprint(images, torch.cat([s.labels for s in sets]), key),
        "min_count": rules.min_count,
        "noise": rules.noise,
        "suppressed_bins": shown_means.count(False) + shown_pixels.count(False),
    }


def _complete(counts: list[int], m: int) -> list[bool]:
    """Which counts to show: those of at least ``m``, then, while the hidden ones add up to between 1 and m - 1
    (what subtraction from the total would reveal), the smallest shown one hidden too (complementary suppression)."""
    keep = [c >= m for c in counts]
    while 0 < sum(c for c, k in zip(counts, keep) if not k) < m and any(keep):
        smallest = min((c, i) for i, (c, k) in enumerate(zip(counts, keep)) if k)[1]
        keep[smallest] = False
    return keep


def _complete_pixels(presence: torch.Tensor, m: int) -> list[bool]:
    """Which pixel-histogram bins to show: those at least ``m`` images reach, then, while the images reaching any
    hidden bin number between 1 and m - 1, the least-reached shown bin hidden too."""
    reach = presence.sum(0)
    keep = (reach >= m).tolist()
    while any(keep):
        hidden = [i for i, k in enumerate(keep) if not k]
        behind = int(presence[:, hidden].any(1).sum()) if hidden else 0
        if behind == 0 or behind >= m:
            break
        smallest = min((int(reach[i]), i) for i, k in enumerate(keep) if k)[1]
        keep[smallest] = False
    return keep


def fingerprint(images: torch.Tensor, labels: torch.Tensor, key: bytes) -> str:
    """HMAC-SHA256 (keyed by the site's salt) over the sorted hashes of every image with its label."""
    digests = sorted(hashlib.sha256(image.numpy().tobytes() + bytes([int(label)])).digest()
                     for image, label in zip(images, labels))
    return hmac.new(key, b"".join(digests), hashlib.sha256).hexdigest()


# ----------------------------------------------------------------------------- comparing the sites
def _distribution(row: dict) -> list[float] | None:
    shares = row.get("pixels") or []
    if not shares or all(s is None for s in shares):
        return None
    return [s or 0.0 for s in shares]


def compare(rows: list[dict]) -> dict:
    """The sites side by side: label-prior shift (the spread of training prevalence), intensity shift (the largest
    total-variation distance between two sites' pixel histograms, over the bins both show, and the spread of their
    mean intensity) and quantity skew (the largest over the smallest training set), each with the study's findings."""
    live = [r for r in rows if r]
    prevalence = {r["name"]: r["counts"]["train"]["positives"] / max(r["counts"]["train"]["n"], 1) for r in live}
    sizes = {r["name"]: r["counts"]["train"]["n"] for r in live}
    distances = []
    for a in range(len(live)):
        for b in range(a + 1, len(live)):
            p, q = _distribution(live[a]), _distribution(live[b])
            if p is None or q is None:
                continue
            both = [k for k in range(len(p)) if live[a]["pixels"][k] is not None and live[b]["pixels"][k] is not None]
            sp, sq = sum(p[k] for k in both) or 1.0, sum(q[k] for k in both) or 1.0
            distances.append((0.5 * sum(abs(p[k] / sp - q[k] / sq) for k in both), live[a]["name"], live[b]["name"]))
    means = [r["mean"] for r in live if r.get("mean") is not None]
    label = max(prevalence.values()) - min(prevalence.values()) if prevalence else math.nan
    quantity = max(sizes.values()) / max(min(sizes.values()), 1) if sizes else math.nan
    widest = max(distances) if distances else None
    return {
        "label_prior_shift": {"prevalence": prevalence, "spread": label, "study_spread": STUDY_SETTINGS["label"],
                              "study": STUDY["label"]},
        "intensity_shift": {"largest_tv_distance": None if widest is None else widest[0],
                            "between": None if widest is None else list(widest[1:]),
                            "mean_spread": max(means) - min(means) if len(means) > 1 else None,
                            "study": STUDY["intensity"]},
        "quantity_skew": {"train_images": sizes, "ratio": quantity, "study_ratio": STUDY_SETTINGS["quantity"],
                          "study": STUDY["quantity"]},
    }


def format_comparison(rows: list[dict], comparison: dict) -> str:
    """The statistics as text: one line per site, then the three kinds of shift with the study's findings."""
    lines = ["Site statistics (before training; bins from fewer images than a site's minimum are suppressed):",
             f"{'node':<18} {'train':>6} {'prev.':>6} {'mean int.':>9} {'std':>6}  sizes"]
    for r in rows:
        if not r:
            continue
        c = r["counts"]["train"]
        mean = "-" if r["mean"] is None else f"{r['mean']:.3f}"
        std = "-" if r["std"] is None else f"{r['std']:.3f}"
        sizes = ", ".join(f"{k}: {'hidden' if v is None else v}" for k, v in r["sizes"].items())
        lines.append(f"{r['name']:<18} {c['n']:>6} {c['positives'] / max(c['n'], 1):>6.2f} {mean:>9} {std:>6}  {sizes}")
    label, intensity, quantity = (comparison[k] for k in ("label_prior_shift", "intensity_shift", "quantity_skew"))
    tv = intensity["largest_tv_distance"]
    lines += ["",
              f"Label-prior shift: training prevalence spread {label['spread']:.2f} (the study's label skew: "
              f"{label['study_spread']:.1f}). {label['study']}",
              "Intensity (scanner) shift: " + ("not measurable (too few images shown)" if tv is None else
                                               f"largest total-variation distance between two sites' pixel histograms "
                                               f"{tv:.3f} ({' and '.join(intensity['between'])})")
              + f". {intensity['study']}",
              f"Quantity skew: largest over smallest training set {quantity['ratio']:.1f}x (the study's: "
              f"{quantity['study_ratio']:.0f}x). {quantity['study']}"]
    return "\n".join(lines)
