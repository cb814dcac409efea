"""Strategies: what institutions share after each round and how it is merged.

A strategy answers four questions and nothing else, so a new method is a small class here,
not a change to the orchestrator loop:

- ``plan``: which institutions train together (one model per node; ``central``: one for all);
- ``shared_keys``: which state entries cross an institution's boundary;
- ``weight``: each institution's weight in the all-reduced sum;
- ``combine``: the node's next shared state from its own contribution and the reduced sum
  (the weighted mean, unless the method personalises).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from hsl_lightning.errors import HSLError, suggest

Contribution = Literal["best", "last"]


class Strategy:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: which local state a node contributes: its best epoch of the round by local validation AUC, or its last
    default_contribution: ClassVar[Contribution] = "last"
    #: whether ``combine`` depends on the node's own contribution (then each node keeps its own shared state)
    personal: ClassVar[bool] = False

    def plan(self, num_nodes: int) -> list[tuple[int, ...]]:
        return [(i,) for i in range(num_nodes)]

    def shared_keys(self, state: dict[str, torch.Tensor]) -> list[str]:
        return list(state)

    def weight(self, n_train: int) -> float:
        return 1.0

    def combine(self, own: torch.Tensor, total: torch.Tensor, own_weight: float, total_weight: float) -> torch.Tensor:
        return total / total_weight


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


class Local(Strategy):
    name = "local"
    description = "Local learning: every node trains alone, nothing is shared (lower bound)"

    def shared_keys(self, state):
        return []


class Central(Strategy):
    name = "central"
    description = "Central learning: one model on all nodes' pooled training data (upper bound; moves data)"

    def plan(self, num_nodes):
        return [tuple(range(num_nodes))]

    def shared_keys(self, state):
        return []


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (HSL, FedAvg, Local, Central)}


def get_strategy(strategy: str | Strategy) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise HSLError(f"Unknown strategy '{strategy}'.{suggest(strategy, STRATEGIES)} "
                       f"Available: {', '.join(STRATEGIES)}.")
    return STRATEGIES[strategy]()
