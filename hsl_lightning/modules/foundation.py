"""FoundationProbe: a frozen pretrained encoder with a trainable linear probe.

The foundation-model baseline of the HSL paper (e.g. CLIP): the image tower stays exactly as
pretrained (frozen, always in eval mode, no gradients), and only a linear head is trained, per node
or federated (strategy ``foundation``). Weights come from the hub when online, or from a local
file (``weights=PATH``); offline without a file it fails at once with a message saying so.
"""

from __future__ import annotations

import torch

from hsl_lightning.modules.base import Optimizer
from hsl_lightning.modules.classifier import ClassifierModule


class FoundationProbe(ClassifierModule):
    """Frozen timm encoder (CLIP ViT-B/16 image tower by default) + linear probe on the primary task.

    Feed it images at the encoder's resolution (``data.image_size: 224`` for CLIP ViT-B/16).

    The optimizer's arguments (``lr``, ``weight_decay``, ``optimizer``, ``momentum``, ``fused_optimizer``)
    are those of :class:`~hsl_lightning.modules.base.BinaryTaskModule`.

    Args:
        backbone: the timm name of the frozen encoder.
        in_chans: image channels the encoder takes (3 for CLIP).
        pretrained: load the encoder's pretrained weights from the hub (a frozen random encoder is
            no baseline; use ``weights`` offline).
        weights: a local ``.pth`` or ``.safetensors`` file of the encoder's weights.
    """

    def __init__(self, backbone: str = "vit_base_patch16_clip_224.openai", in_chans: int = 3, pretrained: bool = True,
                 weights: str | None = None, lr: float = 1e-3, weight_decay: float = 1e-4,
                 optimizer: Optimizer = "adamw", momentum: float = 0.0,
                 fused_optimizer: bool = True):
        super().__init__(backbone=backbone, in_chans=in_chans, pretrained=pretrained, weights=weights, dropout=0.0,
                         lr=lr, weight_decay=weight_decay, optimizer=optimizer, momentum=momentum,
                         fused_optimizer=fused_optimizer)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen means frozen: no BatchNorm statistics or dropout updates either
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.representation({"image": image})).squeeze(1)

    def representation_layer(self):
        """The layer whose output is :meth:`representation` (MOON hooks it in the training forward)."""
        return self.encoder

    def representation(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(batch["image"])
