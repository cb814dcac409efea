"""Proximal: a node's local loss carries a pull towards the model it received.

- FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2):
  min_w F_k(w) + mu/2 ||w - w^t||^2, aggregated as FedAvg.
- Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021): a FedAvg global model w, plus a personal model v_k trained on
  F_k(v) + lambda/2 ||v - w^t||^2, which the node deploys.
"""

from __future__ import annotations

import torch

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.strategies.base import Strategy, register


def _proximal_term(anchor: list[tuple[torch.Tensor, torch.Tensor]], coef: float) -> torch.Tensor | None:
    """coef/2 * sum ||p - p_anchor||^2 over (parameter, anchor) pairs; None when there is nothing to add."""
    if not anchor or coef == 0:
        return None
    return 0.5 * coef * sum(((p - a) ** 2).sum() for p, a in anchor)


@register
class FedProx(Strategy):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2).

    Each node minimises h_k(w) = F_k(w) + mu/2 * ||w - w^t||^2, where w^t is the model it received
    at the start of the round; aggregation is FedAvg's (weighted by training-set size). The
    proximal term covers every trainable parameter (BatchNorm statistics are buffers, not in it).
    """

    name = "fedprox"
    description = "FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 in the local loss"
    size_weighted = True

    def __init__(self, mu: float = 0.01):
        if mu < 0:
            raise HSLError(f"fedprox mu must be non-negative, got {mu}.")
        self.mu = mu
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_local(self, module, trainee):
        self._anchor = [(p, p.detach().clone()) for p in module.parameters() if p.requires_grad]

    def local_loss(self, module, batch):
        return _proximal_term(self._anchor, self.mu)


@register
class Ditto(Strategy):
    """Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021, Algorithm 1 and Eq. 2).

    Each round a node (1) trains the received global model w^t on its data as in FedAvg and
    contributes it (size-weighted mean), then (2) trains its own model v_k on
    F_k(v) + lambda/2 ||v - w^t||^2 for the same number of local epochs; it deploys v_k. Choice:
    lambda = 0.1 by default (the paper tunes it per data set); v_k starts from w^1 in the first round.
    """

    name = "ditto"
    description = "Ditto (Li et al. 2021): FedAvg global model plus a personal model kept near it by lambda/2 ||v - w||^2"
    size_weighted = True
    personal_model = True

    def __init__(self, lam: float = 0.1):
        if lam < 0:
            raise HSLError(f"ditto lam must be non-negative, got {lam}.")
        self.lam = lam
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_personal(self, module, trainee, received):
        self._anchor = [(p, received[name].to(p.device)) for name, p in module.named_parameters() if p.requires_grad]

    def local_loss(self, module, batch):
        return _proximal_term(self._anchor, self.lam)  # no anchor during the shared model's plain pass

    def end_personal(self, module, trainee):
        self._anchor = []
