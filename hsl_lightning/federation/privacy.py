"""Node-level differential privacy for the shared model: DP-FedAvg (McMahan, Ramage, Talwar and
Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018).

Each round, every node clips its update (what it contributes minus what it received, over all
shared entries: weights and BatchNorm statistics alike) to L2 norm ``clip`` = C, and the sum of
the clipped contributions carries Gaussian noise of standard deviation ``noise_multiplier`` * C
per coordinate; the merged model is that noisy sum over the node count. Every node weighs 1 (a
size-weighted mean would let one node's data move the sum by more than C).

**Who adds the noise.** No one is trusted to add it for the others: each of the N nodes adds its
own share, N(0, sigma^2 C^2 / N) per coordinate (standard deviation sigma C / sqrt(N)), and the
shares add up to exactly sigma C in the sum. A share alone carries 1/N of the noise variance, so
it protects a node only if no one sees its contribution alone: a deployment's coordinator must
see nothing but the sum, which is what secure aggregation gives (each site's reply masked,
``federation.secure_aggregation``), and DP refuses ``secure_aggregation: false``. With it, the
epsilon holds against the coordinator and against everyone who receives the merged models. It
does not hold against the coordinator in league with k other nodes: they can subtract their own
shares from the sum, leaving a node the noise of the N - k others (noise multiplier
sigma sqrt((N - k) / N); with every other node, sigma / sqrt(N)). :meth:`DifferentialPrivacy.summary`
writes this to ``summary.json``. A node that trusts no one would need all the noise itself (N times
the variance). A node dropped from a round (``min_nodes``) adds no share, so that round's sum would
carry less noise than accounted for: DP refuses ``min_nodes``.

**Where the noise comes from.** The operating system's cryptographic generator, ``os.urandom``,
freshly at every draw: never the run's seed, which ``config.yaml``, ``summary.json`` and the
checkpoints record, so that whoever holds them could otherwise regenerate the noise and subtract it.
A DP run is therefore not reproducible: two runs of one config end with different weights.
:func:`secure_normal` turns 53 random bits into a uniform float64 and pairs of uniforms into two
normals (Box-Muller), in chunks of 2^18 values. ``os.urandom`` rather than ChaCha20 from
``cryptography`` keyed from it: both are cryptographic (Linux's generator is itself ChaCha20),
but the kernel's needs no key held in our process and no package beyond the standard library
(``cryptography`` comes only with the ``flower`` extra). ChaCha20 in user space is about twice as
fast; the difference is small beside a round's training. ``.venv/bin/python benchmarks/dp_noise.py``
(1 thread, medians of 5, a 2-core Intel Xeon shared with other jobs): os.urandom 78 to 94 ms for
the quickstart's 1.7 M values and 0.57 to 0.75 s for a ResNet-18's 11.7 M, per node and round;
the seeded ``torch.randn`` it replaced 37 to 73 ms and 0.45 to 0.58 s; ChaCha20 19 to 44 ms and
0.27 to 0.37 s (:func:`secure_normal` has the details). ``insecure_seeded_noise`` keeps the old seeded draws (per
seed, round and trainee) for tests; a run warns about it, ``summary.json`` says so, and a deployed
site refuses it. Box-Muller in floating point is not an exact Gaussian (its tails stop at 8.6
standard deviations, and floating-point noise has known weaknesses, Mironov, CCS 2012); no
discrete Gaussian is used.

**Accounting.** Every node takes part in every round (sampling rate 1), each round one Gaussian
mechanism with noise multiplier sigma on a sum of sensitivity C. The privacy spent, epsilon at
``delta``, comes from Opacus's accountants (``rdp`` by default; ``prv``, ``gdp``), never from a
formula of ours. It bounds what the sequence of merged models reveals about any one node's
whole data set (node-level DP), not about single images beyond that.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.merge import Mean
from hsl_lightning.secure_random import secure_uniform

ACCOUNTANTS = ("rdp", "prv", "gdp")


@dataclass
class DifferentialPrivacy:
    """DP-FedAvg's settings (see the module docs).

    Args:
        clip: C, the L2 bound on each node's update per round (``inf``: no clipping; the string
            ``inf`` is accepted, as a command line gives it, besides YAML's ``.inf``).
        noise_multiplier: sigma; the round's sum carries N(0, (sigma C)^2) per coordinate.
        delta: the delta at which epsilon is reported.
        accountant: Opacus accountant: ``rdp``, ``prv`` or ``gdp``.
        insecure_seeded_noise: draw the noise from the run's seed (per round and trainee) instead
            of ``os.urandom``, so that a run repeats exactly. For tests only: whoever holds the
            seed (``config.yaml``, ``summary.json``, the checkpoints) can subtract the noise, so the
            epsilon then protects no one. A run warns, ``summary.json`` says so, a deployed site refuses it.
    """

    clip: float | str = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    insecure_seeded_noise: bool = False

    def __post_init__(self):
        if isinstance(self.clip, str):
            try:
                self.clip = float(self.clip)
            except ValueError:
                raise HSLError(f"federation.privacy.clip must be a positive number or inf, got '{self.clip}'.") from None
        if not self.clip > 0:
            raise HSLError(f"federation.privacy.clip must be positive (or inf), got {self.clip}.")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise HSLError(f"federation.privacy.noise_multiplier must be a finite number >= 0, got "
                           f"{self.noise_multiplier}.")
        if not 0 < self.delta < 1:
            raise HSLError(f"federation.privacy.delta must lie in (0, 1), got {self.delta}.")
        if self.accountant not in ACCOUNTANTS:
            raise HSLError(f"federation.privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got "
                           f"'{self.accountant}'.")

    def epsilon(self, rounds: int, noise_multiplier: float | None = None) -> float:
        """The privacy spent after ``rounds`` rounds, from Opacus's accountant (inf without noise);
        ``noise_multiplier``: at another sigma than the run's (what a coalition leaves, :meth:`summary`)."""
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if rounds == 0:
            return 0.0
        if sigma == 0:
            return math.inf
        try:
            from opacus.accountants import create_accountant
        except ImportError as exc:
            raise HSLError("Differential privacy reports epsilon with Opacus's accountant: pip install "
                           "'hsl_lightning[privacy]' (opacus).") from exc
        accountant = create_accountant(self.accountant)
        accountant.history = [(sigma, 1.0, rounds)]  # every node, every round
        return float(accountant.get_epsilon(self.delta))

    def warn_if_insecure(self) -> None:
        """Warn, at the start of a run, that ``insecure_seeded_noise`` makes the noise subtractable."""
        if self.insecure_seeded_noise:
            warnings.warn("federation.privacy.insecure_seeded_noise is on: the DP noise is drawn from the run's seed, "
                          "which config.yaml and summary.json record, so anyone holding them can subtract it and the "
                          "epsilon protects no one. For tests only; a deployed site refuses it.", UserWarning,
                          stacklevel=2)

    def summary(self, rounds: int, nodes: int) -> dict:
        """``summary.json``'s ``privacy`` after ``rounds`` rounds of ``nodes`` noise shares: the settings,
        epsilon, where the noise came from and against whom epsilon holds (see the module docs)."""
        alone = self.noise_multiplier / math.sqrt(nodes)  # a node's own share, all a full coalition leaves it
        if self.insecure_seeded_noise:
            against = ("No one who holds the run's seed (config.yaml, summary.json, the checkpoints): the noise was "
                       "drawn from it (insecure_seeded_noise), so they can regenerate it and subtract it. For tests only.")
        else:
            against = (f"The coordinator, which sees only the masked sum of the {nodes} sites' replies (secure "
                       "aggregation), and everyone who receives the merged models (every site, anyone the model is "
                       "given to). Not the coordinator in league with other sites: together they can subtract their "
                       f"own noise shares from the sum, so with k of the other sites a site keeps only the remaining "
                       f"{nodes} - k sites' noise, noise multiplier {self.noise_multiplier:g} x sqrt(({nodes} - k) / "
                       f"{nodes}); with all {nodes - 1} others, its own share alone ({alone:.4g}), for which epsilon is "
                       "epsilon_against_coordinator_with_all_other_sites. The same holds for a site that dropped out "
                       "after masking whose reply the coordinator still received: secure aggregation can then open "
                       "that one reply (hsl_lightning/flower/secagg.py).")
        return {"mechanism": "DP-FedAvg (node-level, Gaussian, clipped updates)", **vars(self), "rounds": rounds,
                "epsilon": self.epsilon(rounds),
                "noise": "seeded (insecure)" if self.insecure_seeded_noise else "os.urandom",
                "holds_against": against,
                "epsilon_against_coordinator_with_all_other_sites": self.epsilon(rounds, alone)}


def check_supported(strategy, plan: list, shared_numel: int, extras: int) -> None:
    """DP-FedAvg protects a message that is the nodes' model state, merged by a mean, and nothing else."""
    name = strategy.name
    if (strategy.merge_kind is not Mean or strategy.personal_model or len(plan) < 2 or shared_numel == 0
            or extras):
        why = ("nothing is shared" if shared_numel == 0 or len(plan) < 2 else
               "each node keeps a model of its own" if strategy.personal_model else
               "its message also carries vectors of its own (e.g. control variates), which would go unprotected"
               if extras else f"its merge is not a mean of the nodes' states ({strategy.merge_kind.__name__})")
        raise HSLError(f"federation.privacy (DP-FedAvg) clips and noises a mean of the nodes' model states; "
                       f"strategy '{name}' does not fit: {why}. Use it with hsl, fedavg, swarm, fedprox, fedbn, "
                       "fedper, fedrep, moon or fedrcl, or drop federation.privacy.")


def check_secure_aggregation(privacy: DifferentialPrivacy | None, secure_aggregation: bool | None) -> None:
    """DP-FedAvg's noise shares protect a site only if no one sees its reply alone: refuse it without
    secure aggregation (None, the default, turns it on for DP runs)."""
    if privacy is not None and secure_aggregation is False:
        raise HSLError("federation.privacy has each site add only its share of the noise (sigma / sqrt(N) of N "
                       "sites), which protects a site only if the coordinator sees nothing but the sum; with "
                       "secure_aggregation false it would see every site's reply with N times less noise variance "
                       "than the epsilon assumes. Set federation.secure_aggregation to true or null (the default), "
                       "or drop federation.privacy.")


_PAIRS = 1 << 17  # uniform pairs per chunk of secure_normal: 2^18 normals, 2 MiB of random bytes


def secure_normal(n: int, random_bytes=os.urandom) -> torch.Tensor:
    """``n`` independent standard normals in float64 (CPU) from ``os.urandom``, fresh at every call
    (``random_bytes``: another source of bytes, for the benchmark's ChaCha20).

    Each value takes 64 random bits, of which the low 53 make a uniform u in [0, 1) (every multiple
    of 2^-53 equally likely); the first half of a chunk's uniforms gives radii sqrt(-2 log(1 - u)),
    with 1 - u in (0, 1] so the log is finite, the second half angles 2 pi u, and each pair two
    normals r cos and r sin (Box-Muller). ``benchmarks/dp_noise.py`` (1 thread, medians of 5, three
    runs on the 2-core Intel Xeon of 2026-12-07 while other jobs shared it; ``calibrate.py`` gave
    26 images/s on 2 threads, 97 on 1): 1.7 M values in 78 to 94 ms, 11.7 M in 0.57 to 0.75 s; the
    seeded ``torch.randn`` it replaced 37 to 73 ms and 0.45 to 0.58 s; the same Box-Muller fed by
    ChaCha20 19 to 44 ms and 0.27 to 0.37 s. Reading ``os.urandom`` is most of the cost."""
    pairs = (n + 1) // 2
    out = torch.empty(2 * pairs, dtype=torch.float64)
    for start in range(0, pairs, _PAIRS):
        k = min(_PAIRS, pairs - start)
        u = secure_uniform(2 * k, random_bytes)
        radius = u[:k].neg_().log1p_().mul_(-2.0).sqrt_()
        angle = u[k:].mul_(2 * math.pi)
        chunk = out[2 * start: 2 * start + 2 * k]
        torch.cos(angle, out=chunk[:k]).mul_(radius)
        torch.sin(angle, out=chunk[k:]).mul_(radius)
    return out[:n]


class PrivateMean(Mean):
    """:class:`Mean` with DP-FedAvg: each contribution is the received state plus the node's update
    clipped to ``clip``, plus the node's share of the noise: fresh from :func:`secure_normal`, or
    with ``insecure_seeded_noise`` seeded per (``seed``, trainee), ``seed`` being the round's."""

    def __init__(self, run, received: torch.Tensor, privacy: DifferentialPrivacy, seed: int):
        super().__init__(run, received)
        self.privacy, self.seed = privacy, seed
        self.norms: dict[int, float] = {}  # each trainee's update norm before clipping, to choose C by

    def contribute(self, message, trainee, state, weight):
        flat = self.run.packer.pack(state, message.vector.device)
        update = flat - self.received
        norm = float(torch.linalg.vector_norm(update))
        self.norms[trainee] = norm
        if norm > self.privacy.clip:
            update = update * (self.privacy.clip / norm)
        share = self.received + update
        sigma = self.privacy.noise_multiplier * self.privacy.clip
        if sigma > 0:
            if self.privacy.insecure_seeded_noise:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainee)
                noise = torch.randn(share.shape, generator=g, dtype=torch.float64)
            else:
                noise = secure_normal(share.numel()).reshape(share.shape)
            share = share + noise.to(share.device) * (sigma / math.sqrt(len(self.run.plan)))
        message.state.add_(share, alpha=weight)
