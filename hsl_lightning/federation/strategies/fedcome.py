"""FedCOME (Zheng, Ye, Li and Gao, "Federated Learning via Consensus Mechanism on Heterogeneous Data:
A New Perspective on Convergence", ICASSP 2024; arXiv 2311.12358).

Rule: the server moves each node's update Delta_i to the nearest vector at an acute (or right)
angle with every node's update, then takes the size-weighted mean of the adjusted updates.
"""

from __future__ import annotations

import torch

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.merge import Server
from hsl_lightning.federation.strategies.base import Strategy, register


def consensus_coefficients(gram: torch.Tensor, sizes: torch.Tensor, iterations: int = 5000) -> torch.Tensor:
    """FedCOME's merge as coefficients on the updates: alpha = sum_i n_i x_i / sum_i n_i, where
    Delta x_i is node i's update corrected to the nearest vector in the cone
    {y : Delta_k . y >= 0 for every k}. By Moreau's decomposition x_i = e_i + lambda_i with
    lambda_i = argmin_{lambda >= 0} ||Delta (e_i + lambda)||^2, a non-negative least-squares problem
    in the Gram matrix ``gram`` = Delta^T Delta, solved here by accelerated projected gradient."""
    m = gram.shape[0]
    g = gram.double()
    scale = g.diagonal().max().clamp(min=1e-300)
    g = g / scale  # the solution does not depend on the scale
    step = 1.0 / (2 * torch.linalg.eigvalsh(g).max().clamp(min=1e-12))
    eye = torch.eye(m, dtype=torch.float64, device=g.device)
    lam = torch.zeros(m, m, dtype=torch.float64, device=g.device)  # row i: lambda_i
    momentum = lam.clone()
    t = 1.0
    for _ in range(iterations):
        grad = 2 * (eye + momentum) @ g
        nxt = (momentum - step * grad).clamp(min=0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum = nxt + ((t - 1) / t_next) * (nxt - lam)
        if torch.allclose(nxt, lam, atol=1e-13, rtol=0):
            lam = nxt
            break
        lam, t = nxt, t_next
    x = eye + lam
    w = sizes.double().to(g.device)
    return (w[:, None] * x).sum(0) / w.sum()


@register
class FedCOME(Strategy):
    """FedCOME (Zheng, Ye, Li and Gao, "Federated Learning via Consensus Mechanism on Heterogeneous
    Data: A New Perspective on Convergence", ICASSP 2024; arXiv 2311.12358).

    Consensus: after a round, the server adjusts each node's update Delta_i slightly, to the nearest
    vector that makes an acute (or right) angle with every node's original update, so that the
    merged step lowers no node's first-order risk; the adjusted updates are averaged with FedAvg's
    size weights. The adjustment is solved as in the authors' code (github.com/fedcome/fedcome,
    ``SIMPLE_SIMPLE_QP``): min_x ||Delta x - Delta_i||^2 s.t. Delta_k^T Delta x >= 0 for all k (see
    :func:`consensus_coefficients`). The merged step is a combination of the updates, so only
    their Gram matrix is needed to find it.

    Choices: the consensus covers the trainable parameters; buffers (BatchNorm statistics) take
    FedAvg's weighted mean. The authors' code also clips every coordinate of the merged step at
    0.005; the method's description does not, and the bound depends on the learning rate, so it is
    an option here (``clip``), off by default. All nodes take part every round (the paper's
    client-sampling rule for partial participation does not apply).
    """

    name = "fedcome"
    description = ("FedCOME (Zheng et al. 2024): server adjusts each update so the merged step lowers every "
                   "node's risk, then size-weighted mean")
    size_weighted = True
    merge_kind = Server

    def __init__(self, clip: float | None = None):
        if clip is not None and clip <= 0:
            raise HSLError(f"fedcome clip must be positive (or null for none), got {clip}.")
        self.clip = clip

    def aggregate(self, received, contributions, sizes, is_param):
        updates = contributions[:, is_param] - received[is_param]
        alpha = consensus_coefficients(updates @ updates.T, sizes)
        step = alpha.to(updates.dtype) @ updates
        if self.clip is not None:
            step = step.clamp(-self.clip, self.clip)
        merged = received.clone()
        merged[is_param] += step
        w = sizes.to(contributions.dtype)
        merged[~is_param] = (w @ contributions[:, ~is_param]) / w.sum()
        return merged
