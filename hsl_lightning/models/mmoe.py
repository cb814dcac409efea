"""The auxiliary learning architecture of HeteroSync Learning.

Two image encoders (primary task, Shared Anchor Task) feed a multi-gate mixture of experts
(MMoE; Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018). For task k with gate g_k and experts f_1..f_E:

    h   = softmax([f1 ; f2] / T)                     shared embedding, T = temperature
    z_k = sum_e  softmax(W_k h)_e * f_e(h)  +  s_k(f_k)   gate-weighted experts + skip projection
    y_k = tower_k(z_k)                               one binary logit per task

where f1, f2 are the projected encoder features of the primary and SAT images and s_k a
per-task linear skip projection of that task's own feature. Defaults are the reference
configuration (about 23.7 M parameters with two ResNet-18 trunks).

``embedding: identity`` (a variant, not the reference) feeds [f1 ; f2] to the experts and gates
unchanged: the softmax over 1024 non-negative features at T = 3 gives entries near 1/1024 whatever
the image, which leaves the experts little to work with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hsl_lightning.errors import HSLError
from hsl_lightning.models.backbones import create_backbone

PRIMARY, SAT = 0, 1


def _mlp(n_in: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class MMoE(nn.Module):
    """Experts shared by all tasks, one softmax gate per task over the experts."""

    def __init__(self, in_features: int = 1024, num_experts: int = 12, expert_hidden: int = 62,
                 expert_dim: int = 32, expert_dropout: float = 0.3, num_tasks: int = 2):
        super().__init__()
        self.experts = nn.ModuleList(
            _mlp(in_features, expert_hidden, expert_dim, expert_dropout) for _ in range(num_experts)
        )
        self.gates = nn.ModuleList(nn.Linear(in_features, num_experts) for _ in range(num_tasks))

    def forward(self, h: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return, per task, the gate-mixed expert output (B, expert_dim) and the gate weights (B, E)."""
        expert_out = torch.stack([expert(h) for expert in self.experts], dim=1)  # (B, E, D)
        gates = [torch.softmax(gate(h), dim=-1) for gate in self.gates]
        mixed = [torch.einsum("be,bed->bd", g, expert_out) for g in gates]
        return mixed, gates


class SharedBottom(nn.Module):
    """The ablation of the MMoE: one shared network feeds every task (no experts, no gates), with as
    many hidden units as all experts together."""

    def __init__(self, in_features: int = 1024, num_experts: int = 12, expert_hidden: int = 62,
                 expert_dim: int = 32, expert_dropout: float = 0.3, num_tasks: int = 2):
        super().__init__()
        self.bottom = _mlp(in_features, expert_hidden * num_experts, expert_dim, expert_dropout)
        self.num_tasks = num_tasks

    def forward(self, h: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shared = self.bottom(h)
        ones = torch.ones(h.shape[0], 1, device=h.device, dtype=h.dtype)
        return [shared] * self.num_tasks, [ones] * self.num_tasks


@dataclass
class HSLOutput:
    """The HSL network's output: the primary task's logit, the SAT's logit and each task's gate weights."""
    primary_logit: torch.Tensor  # (B,)
    sat_logit: torch.Tensor  # (B,)
    gates: list[torch.Tensor]  # per task (B, num_experts)


class HSLNetwork(nn.Module):
    """Primary and SAT encoders coupled by an MMoE, with one binary tower per task.

    ``mixture``: ``mmoe`` (the method) or ``shared_bottom`` (ablation: :class:`SharedBottom`);
    ``embedding``: ``softmax`` (the reference) or ``identity`` (see the module docstring);
    ``init``: ``xavier``: the linear layers of the experts, gates and towers start Xavier-uniform
    with zero biases, as the reference's Keras layers do (glorot_uniform, zeros); ``torch``: torch's
    default (Kaiming-uniform), for runs recorded before this option.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_chans: int = 1,
        pretrained: bool = False,
        weights: str | None = None,
        shared_encoder: bool = False,
        proj_dim: int = 512,
        skip_dim: int = 32,
        temperature: float = 3.0,
        num_experts: int = 12,
        expert_hidden: int = 62,
        expert_dropout: float = 0.3,
        tower_hidden: int = 16,
        tower_dropout: float = 0.4,
        mixture: str = "mmoe",
        embedding: str = "softmax",
        init: str = "xavier",
    ):
        super().__init__()
        mixtures = {"mmoe": MMoE, "shared_bottom": SharedBottom}
        if mixture not in mixtures:
            raise HSLError(f"mixture must be one of {', '.join(mixtures)}, got '{mixture}'.")
        if embedding not in ("softmax", "identity"):
            raise HSLError(f"embedding must be softmax or identity, got '{embedding}'.")
        if init not in ("xavier", "torch"):
            raise HSLError(f"init must be xavier or torch, got '{init}'.")
        self.temperature, self.embedding = temperature, embedding
        make = lambda: create_backbone(backbone, in_chans=in_chans, pretrained=pretrained, weights=weights)  # noqa: E731
        self.primary_encoder = make()
        # With a shared trunk both tasks read the same weights (registered once, so the state holds
        # it once and synchronisation counts it once); the per-task projections stay separate.
        self.sat_encoder = None if shared_encoder else make()
        n = self.primary_encoder.num_features
        self.primary_proj = nn.Sequential(nn.Linear(n, proj_dim), nn.ReLU())
        self.sat_proj = nn.Sequential(nn.Linear(n, proj_dim), nn.ReLU())
        self.primary_skip = nn.Linear(proj_dim, skip_dim)
        self.sat_skip = nn.Linear(proj_dim, skip_dim)
        self.mmoe = mixtures[mixture](2 * proj_dim, num_experts, expert_hidden, skip_dim, expert_dropout, num_tasks=2)
        self.primary_tower = _mlp(skip_dim, tower_hidden, 1, tower_dropout)
        self.sat_tower = _mlp(skip_dim, tower_hidden, 1, tower_dropout)
        if init == "xavier":
            for part in (self.mmoe, self.primary_tower, self.sat_tower):
                for layer in part.modules():
                    if isinstance(layer, nn.Linear):
                        nn.init.xavier_uniform_(layer.weight)
                        nn.init.zeros_(layer.bias)

    def sat_features(self, sat_images: torch.Tensor) -> torch.Tensor:
        """Projected SAT-encoder features f2 (B, proj_dim)."""
        encoder = self.primary_encoder if self.sat_encoder is None else self.sat_encoder
        return self.sat_proj(encoder(sat_images))

    def forward(self, primary: torch.Tensor, sat: torch.Tensor | None = None,
                sat_feature: torch.Tensor | None = None) -> HSLOutput:
        """``sat``: SAT images paired with ``primary``; or ``sat_feature``: precomputed f2, (B or 1, proj_dim)."""
        f1 = self.primary_proj(self.primary_encoder(primary))
        if sat_feature is None:
            f2 = self.sat_features(primary if sat is None else sat)
        else:
            f2 = sat_feature.expand(f1.shape[0], -1)
        h = torch.cat([f1, f2], dim=1)
        if self.embedding == "softmax":
            h = torch.softmax(h / self.temperature, dim=1)
        (z_primary, z_sat), gates = self.mmoe(h)
        z_primary = z_primary + self.primary_skip(f1)
        z_sat = z_sat + self.sat_skip(f2)
        return HSLOutput(self.primary_tower(z_primary).squeeze(1), self.sat_tower(z_sat).squeeze(1), gates)
