"""Strategies: what institutions share after each round and how it is merged.

A strategy answers a few questions and nothing else, so a new method is a small class here,
not a change to the orchestrator loop:

- ``plan``: which institutions train together (one model per node; ``central``: one for all);
- ``shared_keys``: which state entries cross an institution's boundary;
- ``weight``: each institution's weight in the all-reduced sum;
- ``combine``: the node's next shared state from its own contribution and the reduced sum
  (the weighted mean, unless the method personalises);
- ``begin_local`` / ``local_loss``: an extra term of the local objective (e.g. FedProx).
"""

from __future__ import annotations

import inspect
from typing import ClassVar, Literal

import torch
from torch import nn

from hsl_lightning.errors import HSLError, suggest

Contribution = Literal["best", "last"]


class Strategy:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: which local state a node contributes: its best epoch of the round by local validation AUC, or its last
    default_contribution: ClassVar[Contribution] = "last"
    #: whether ``combine`` depends on the node's own contribution (then each node keeps its own shared state)
    personal: ClassVar[bool] = False

    def options(self) -> dict:
        """The strategy's settings (its constructor's arguments), for logs and configs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def plan(self, num_nodes: int) -> list[tuple[int, ...]]:
        return [(i,) for i in range(num_nodes)]

    def shared_keys(self, module: nn.Module) -> list[str]:
        return list(module.state_dict())

    def weight(self, n_train: int) -> float:
        return 1.0

    def combine(self, own: torch.Tensor, total: torch.Tensor, own_weight: float, total_weight: float) -> torch.Tensor:
        return total / total_weight

    def begin_local(self, module: nn.Module) -> None:
        """Called when an institution starts a round's local training, its model holding what it received."""

    def local_loss(self, module: nn.Module) -> torch.Tensor | None:
        """An extra term added to every local training step's loss (None: nothing)."""
        return None


class HSL(Strategy):
    name = "hsl"
    description = ("HeteroSync Learning sync: unweighted mean of every state entry (encoders, experts, gates, "
                   "towers, BatchNorm statistics); each node contributes its best epoch of the round")
    default_contribution = "best"


class FedAvg(Strategy):
    name = "fedavg"
    description = "FedAvg (McMahan et al. 2017): mean of every state entry weighted by each node's training-set size"

    def weight(self, n_train: int) -> float:
        return float(n_train)


class Swarm(Strategy):
    name = "swarm"
    description = ("Swarm Learning (Warnat-Herresthal et al. 2021): decentralised unweighted mean of every entry, "
                   "no server; the HSL sync without the SAT")


class Local(Strategy):
    name = "local"
    description = "Local learning: every node trains alone, nothing is shared (lower bound)"

    def shared_keys(self, module):
        return []


class Central(Strategy):
    name = "central"
    description = "Central learning: one model on all nodes' pooled training data (upper bound; moves data)"

    def plan(self, num_nodes):
        return [tuple(range(num_nodes))]

    def shared_keys(self, module):
        return []


class Personalized(Strategy):
    """The HSL paper's Personalized Learning baseline: w_i <- 0.5 w_i + 0.5 mean_{j != i} w_j.

    The mean of the others is recovered from the all-reduced sum: (sum - w_i) / (N - 1). With a
    single node there are no others and the node keeps its own weights.
    """

    name = "personalized"
    description = "Personalized Learning (HSL paper baseline): each node keeps 0.5 own + 0.5 mean of the other nodes"
    personal = True

    def combine(self, own, total, own_weight, total_weight):
        if total_weight - own_weight <= 0:
            return own.clone()
        others = (total - own_weight * own) / (total_weight - own_weight)
        return 0.5 * own + 0.5 * others


class FedProx(Strategy):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2).

    Each node minimises h_k(w) = F_k(w) + mu/2 * ||w - w^t||^2, where w^t is the model it received
    at the start of the round; aggregation is FedAvg's (weighted by training-set size). The
    proximal term covers every trainable parameter (BatchNorm statistics are buffers, not in it).
    """

    name = "fedprox"
    description = "FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 in the local loss"

    def __init__(self, mu: float = 0.01):
        if mu < 0:
            raise HSLError(f"fedprox mu must be non-negative, got {mu}.")
        self.mu = mu
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def weight(self, n_train: int) -> float:
        return float(n_train)

    def begin_local(self, module):
        self._anchor = [(p, p.detach().clone()) for p in module.parameters() if p.requires_grad]

    def local_loss(self, module):
        if not self._anchor or self.mu == 0:
            return None
        return 0.5 * self.mu * sum(((p - p0) ** 2).sum() for p, p0 in self._anchor)


def _prefixed_keys(module: nn.Module, predicate) -> set[str]:
    keys = set()
    for prefix, sub in module.named_modules():
        if predicate(prefix, sub):
            keys.update(f"{prefix}.{k}" if prefix else k for k in sub.state_dict())
    return keys


class FedBN(Strategy):
    """FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization", ICLR 2021): every BatchNorm layer (affine weights and running statistics)
    stays local; the rest is averaged. Choice: averaged with FedAvg's size weights (the paper's
    experiments use equal-sized clients, where the two coincide)."""

    name = "fedbn"
    description = "FedBN (Li et al. 2021): BatchNorm weights and statistics stay local, the rest is size-weighted mean"

    def weight(self, n_train: int) -> float:
        return float(n_train)

    def shared_keys(self, module):
        local = _prefixed_keys(module, lambda _, m: isinstance(m, nn.modules.batchnorm._BatchNorm))
        return [k for k in module.state_dict() if k not in local]


class FedPer(Strategy):
    """FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019):
    base layers are averaged FedAvg-style, the personalisation layers stay local. Which layers
    are personal is the module's ``head_prefixes`` (the classifier head; HSL's task towers)."""

    name = "fedper"
    description = "FedPer (Arivazhagan et al. 2019): shared base layers (size-weighted mean), personal head stays local"

    def weight(self, n_train: int) -> float:
        return float(n_train)

    def shared_keys(self, module):
        prefixes = tuple(getattr(module, "head_prefixes", ()))
        if not prefixes:
            raise HSLError(f"fedper needs the module to name its personal layers: {type(module).__name__} has no "
                           "head_prefixes.")
        return [k for k in module.state_dict() if not k.startswith(prefixes)]


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (HSL, FedAvg, Swarm, Personalized, FedProx, FedBN, FedPer, Local, Central)
}


def get_strategy(strategy: str | Strategy, options: dict | None = None) -> Strategy:
    """A strategy by name (``options``: its constructor's keyword arguments, e.g. ``{"mu": 0.1}``)."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise HSLError(f"Unknown strategy '{strategy}'.{suggest(strategy, STRATEGIES)} "
                       f"Available: {', '.join(STRATEGIES)}.")
    cls = STRATEGIES[strategy]
    options = dict(options or {})
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise HSLError(f"Strategy '{strategy}' has no option {', '.join(unknown)}; "
                       f"it takes: {', '.join(accepted) or 'no options'}.")
    return cls(**options)
