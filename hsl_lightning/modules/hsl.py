"""HSLModule: the HeteroSync Learning model (primary + SAT towers on the MMoE)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from hsl_lightning.errors import HSLError
from hsl_lightning.models.mmoe import HSLNetwork
from hsl_lightning.modules.base import BinaryTaskModule, Optimizer

SatInference = Literal["primary", "reference", "paired"]


class HSLModule(BinaryTaskModule):
    """Primary task and Shared Anchor Task trained jointly through the MMoE.

    Loss = ``primary_weight`` * BCE(primary) + ``sat_weight`` * BCE(SAT), on logits.

    ``sat_inference`` decides what the SAT branch sees when only a primary image exists:
    ``primary``: the primary image goes through both branches; ``reference``: the SAT feature is
    the mean SAT-encoder feature of a fixed batch of public SAT images (``set_sat_reference``),
    the same for every image; ``paired``: each image gets a fixed, seeded SAT partner from the
    evaluation batch (``sat_image``). The default and the measurements behind it are on the documentation site
    (docs/concepts.md, "What the SAT branch sees at inference").

    The network's arguments (backbone ... tower_dropout, mixture, embedding) are those of
    :class:`HSLNetwork`; ``mixture: shared_bottom`` replaces the MMoE by one shared network (an
    ablation); ``embedding: identity`` skips the softmax in front of the experts (a variant);
    ``init``: ``xavier`` (the reference's Keras layers) or ``torch`` (torch's default, which this
    library used before) for the experts, gates and towers.

    The trunk's arguments (``backbone``, ``in_chans``, ``pretrained``, ``weights``) are those of
    :class:`~hsl_lightning.models.backbones.Backbone`, the optimizer's (``lr``, ``weight_decay``,
    ``optimizer``, ``momentum``, ``fused_optimizer``) those of :class:`~hsl_lightning.modules.base.BinaryTaskModule`.

    Args:
        shared_encoder: one trunk for both tasks (its weights held and synchronised once) instead of two.
        proj_dim: width of each task's projected encoder feature (the experts see twice this).
        skip_dim: width of the experts' outputs and of each task's skip projection.
        temperature: T of the shared embedding softmax([f1 ; f2] / T).
        num_experts: experts shared by both tasks.
        expert_hidden: hidden units of each expert.
        expert_dropout: dropout inside each expert.
        tower_hidden: hidden units of each task's tower.
        tower_dropout: dropout inside each tower.
        primary_weight: weight of the primary task's BCE in the loss.
        sat_weight: weight of the SAT's BCE in the loss.
        sat_inference: what the SAT branch sees at inference: ``primary``, ``reference`` or ``paired``.
        mixture: ``mmoe`` (the method) or ``shared_bottom`` (an ablation).
        embedding: ``softmax`` (the reference) or ``identity`` (a variant).
        init: ``xavier`` (the reference) or ``torch`` for the experts, gates and towers.
    """

    uses_sat = True
    head_prefixes = ("net.primary_tower.", "net.sat_tower.")  # personal layers for FedPer-style strategies

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
        primary_weight: float = 0.5,
        sat_weight: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: Optimizer = "adamw",
        momentum: float = 0.0,
        fused_optimizer: bool = True,
        sat_inference: SatInference = "primary",
        mixture: Literal["mmoe", "shared_bottom"] = "mmoe",
        embedding: Literal["softmax", "identity"] = "softmax",
        init: Literal["xavier", "torch"] = "xavier",
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, optimizer=optimizer, momentum=momentum,
                         fused_optimizer=fused_optimizer)
        if sat_inference not in ("primary", "reference", "paired"):
            raise HSLError(f"sat_inference must be primary, reference or paired, got '{sat_inference}'.")
        self.save_hyperparameters()
        self.primary_weight, self.sat_weight, self.sat_inference = primary_weight, sat_weight, sat_inference
        self.net = HSLNetwork(
            backbone=backbone, in_chans=in_chans, pretrained=pretrained, weights=weights,
            shared_encoder=shared_encoder, proj_dim=proj_dim, skip_dim=skip_dim, temperature=temperature,
            num_experts=num_experts, expert_hidden=expert_hidden, expert_dropout=expert_dropout,
            tower_hidden=tower_hidden, tower_dropout=tower_dropout, mixture=mixture, embedding=embedding,
            init=init,
        )
        # Public SAT images for 'reference' inference; not part of the state (never averaged).
        self.register_buffer("sat_reference", None, persistent=False)

    def set_sat_reference(self, images: torch.Tensor | None) -> None:
        """The public SAT images used by ``sat_inference: reference`` (None: forget them)."""
        self.sat_reference = None if images is None else images.to(self.device)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.sat_reference is None and hasattr(dm, "sat_reference"):
            self.set_sat_reference(dm.sat_reference())

    def forward(self, image: torch.Tensor, sat_image: torch.Tensor | None = None):
        return self.net(image, sat_image)

    def representation(self, batch: dict) -> torch.Tensor:
        """The projected primary feature f1 (representation-level methods such as MOON use it)."""
        return self.net.primary_proj(self.net.primary_encoder(batch["image"]))

    def representation_layer(self):
        """The layer whose output is :meth:`representation` (MOON hooks it in the training forward)."""
        return self.net.primary_proj

    def feature_levels(self) -> list:
        """The primary encoder's stem and stages: multi-level methods (FedRCL) hook them."""
        if self.net.sat_encoder is None:
            raise HSLError("With shared_encoder the primary encoder also sees SAT images, so its feature levels do not "
                           "belong to the primary labels; multi-level methods need shared_encoder: false.")
        return self.net.primary_encoder.feature_levels()

    def training_loss(self, batch: dict):
        if "sat_image" not in batch:
            raise HSLError("HSLModule trains on paired batches with 'sat_image'; the data module has no SAT "
                           "(data.use_sat is false or data.sat is null). Use ClassifierModule for primary-only training.")
        out = self.net(batch["image"], batch["sat_image"])
        primary = F.binary_cross_entropy_with_logits(out.primary_logit.float(), batch["label"].float())
        sat = F.binary_cross_entropy_with_logits(out.sat_logit.float(), batch["sat_label"].float())
        return self.primary_weight * primary + self.sat_weight * sat, {"primary_loss": primary, "sat_loss": sat}

    def primary_logits(self, batch: dict, policy: SatInference | None = None) -> torch.Tensor:
        policy = policy or self.sat_inference
        image = batch["image"]
        if policy == "primary":
            return self.net(image, image).primary_logit
        if policy == "paired":
            if "sat_image" not in batch:
                raise HSLError("sat_inference 'paired' needs evaluation batches with 'sat_image' (a data module with a SAT).")
            return self.net(image, batch["sat_image"]).primary_logit
        if self.sat_reference is None:
            raise HSLError("sat_inference 'reference' needs SAT reference images: call set_sat_reference(images) "
                           "or use a data module with a SAT.")
        feature = self.net.sat_features(self.sat_reference.to(image.dtype)).mean(0, keepdim=True)
        return self.net(image, sat_feature=feature).primary_logit
