"""ClassifierModule: a plain timm classifier for single-task baselines (local, central, FedAvg...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hsl_lightning.models.backbones import create_backbone
from hsl_lightning.modules.base import BinaryTaskModule, Optimizer


class ClassifierModule(BinaryTaskModule):
    """timm backbone + dropout + one linear logit, trained with BCE on the primary task only.

    The trunk's arguments (``backbone``, ``in_chans``, ``pretrained``, ``weights``) are those of
    :class:`~hsl_lightning.models.backbones.Backbone`, the optimizer's (``lr``, ``weight_decay``,
    ``optimizer``, ``momentum``, ``fused_optimizer``) those of :class:`~hsl_lightning.modules.base.BinaryTaskModule`.

    Args:
        dropout: dropout before the logit.
    """

    uses_sat = False
    head_prefixes = ("head.",)  # the personal layers of personalisation strategies (FedPer)

    def __init__(self, backbone: str = "resnet18", in_chans: int = 1, pretrained: bool = False,
                 weights: str | None = None, dropout: float = 0.0, lr: float = 1e-3, weight_decay: float = 1e-4,
                 optimizer: Optimizer = "adamw", momentum: float = 0.0,
                 fused_optimizer: bool = True):
        super().__init__(lr=lr, weight_decay=weight_decay, optimizer=optimizer, momentum=momentum,
                         fused_optimizer=fused_optimizer)
        self.save_hyperparameters()
        self.encoder = create_backbone(backbone, in_chans=in_chans, pretrained=pretrained, weights=weights)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.num_features, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(image)).squeeze(1)

    def representation(self, batch: dict) -> torch.Tensor:
        """The pooled encoder feature (representation-level methods such as MOON use it)."""
        return self.encoder(batch["image"])

    def representation_layer(self) -> nn.Module:
        """The layer whose output is :meth:`representation` (MOON hooks it in the training forward)."""
        return self.encoder

    def feature_levels(self) -> list[nn.Module]:
        """The backbone's stem and stages: multi-level methods (FedRCL) hook them."""
        return self.encoder.feature_levels()

    def training_loss(self, batch: dict):
        loss = F.binary_cross_entropy_with_logits(self(batch["image"]).float(), batch["label"].float())
        return loss, {}

    def primary_logits(self, batch: dict) -> torch.Tensor:
        return self(batch["image"])
