"""Node-level differential privacy for the shared model: DP-FedAvg (McMahan, Ramage, Talwar and
Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018).

Each round, every node clips its update (what it contributes minus what it received, over all
shared entries: weights and BatchNorm statistics alike) to L2 norm ``clip`` = C, and the sum of
the clipped contributions carries Gaussian noise of standard deviation ``noise_multiplier`` * C
per coordinate; the merged model is that noisy sum over the node count. Every node weighs 1 (a
size-weighted mean would let one node's data move the sum by more than C).

**Who adds the noise.** There is no server: the sum is an all-reduce over the nodes' ranks. So
each of the N nodes adds its own share, N(0, sigma^2 C^2 / N), and the shares add up to exactly
sigma * C in the sum. This protects a node's data from whoever sees the merged model (every
participant, and anyone the model is shared with later), provided the other nodes add their
shares; a node that trusts no one else would need all the noise itself (N times the variance).
A node dropped from a round (``min_nodes``) adds no share, so that round's sum carries less noise
than accounted for: runs with DP should not allow dropping.

**Accounting.** Every node takes part in every round (sampling rate 1), each round one Gaussian
mechanism with noise multiplier sigma on a sum of sensitivity C. The privacy spent, epsilon at
``delta``, comes from Opacus's accountants (``rdp`` by default; ``prv``, ``gdp``), never from a
formula of ours. It bounds what the sequence of merged models reveals about any one node's
whole data set (node-level DP), not about single images beyond that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.merge import Mean

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
    """

    clip: float | str = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"

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

    def epsilon(self, rounds: int) -> float:
        """The privacy spent after ``rounds`` rounds, from Opacus's accountant (inf without noise)."""
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        try:
            from opacus.accountants import create_accountant
        except ImportError as exc:
            raise HSLError("Differential privacy reports epsilon with Opacus's accountant: pip install "
                           "'hsl_lightning[privacy]' (opacus).") from exc
        accountant = create_accountant(self.accountant)
        accountant.history = [(self.noise_multiplier, 1.0, rounds)]  # every node, every round
        return float(accountant.get_epsilon(self.delta))


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


class PrivateMean(Mean):
    """:class:`Mean` with DP-FedAvg: each contribution is the received state plus the node's update
    clipped to ``clip``, plus the node's share of the noise (seeded per (seed, round, trainee))."""

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
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainee)
            noise = torch.randn(share.shape, generator=g, dtype=torch.float64)
            share = share + noise.to(share.device) * (sigma / math.sqrt(len(self.run.plan)))
        message.state.add_(share, alpha=weight)
