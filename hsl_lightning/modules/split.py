"""SplitClassifier: a timm classifier cut in two, for SplitAVG's split training.

The trunk's top-level layers up to and including ``cut`` form the *site part*; every site
(institution) holds its own copy. The remaining layers and the logit form the *server part*,
one for all sites. A batch is routed by its ``node`` key: each image goes through its own site's
part, the feature maps of all sites are concatenated along the batch dimension and the server
part runs once on the concatenation, so its BatchNorm layers and its gradient see the union of
the sites' batches. Backpropagation hands each site exactly the gradient of its own slice.

What crosses a site's boundary while training: its feature maps at the cut and its labels
(forward), the gradient of those feature maps (backward). ``traffic_bytes`` counts them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hsl_lightning.errors import HSLError
from hsl_lightning.models.backbones import create_backbone
from hsl_lightning.modules.base import BinaryTaskModule, Optimizer


class _Normalize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class SplitClassifier(BinaryTaskModule):
    """timm backbone split at ``cut`` (a top-level layer name, e.g. ``conv1``, ``layer1`` for
    ResNets) into per-site parts and one server part with the logit.

    The split needs a backbone whose forward runs its top-level layers one after another (ResNets,
    most CNNs); that is checked once at construction. ``sites``: how many site parts to hold
    (the federation calls :meth:`set_sites` with its node count; a checkpoint records the count).

    The trunk's arguments (``backbone``, ``in_chans``, ``pretrained``, ``weights``) are those of
    :class:`~hsl_lightning.models.backbones.Backbone`, the optimizer's (``lr``, ``weight_decay``,
    ``optimizer``, ``momentum``, ``fused_optimizer``) those of :class:`~hsl_lightning.modules.base.BinaryTaskModule`.

    Args:
        cut: the top-level layer after which a site's part ends and the server's begins.
        dropout: dropout before the logit.
        sites: how many site parts to hold.
    """

    uses_sat = False

    def __init__(self, backbone: str = "resnet18", in_chans: int = 1, pretrained: bool = False,
                 weights: str | None = None, cut: str = "conv1", dropout: float = 0.0, lr: float = 1e-3,
                 weight_decay: float = 1e-4, optimizer: Optimizer = "adamw", momentum: float = 0.0,
                 fused_optimizer: bool = True, sites: int = 1):
        super().__init__(lr=lr, weight_decay=weight_decay, optimizer=optimizer, momentum=momentum,
                         fused_optimizer=fused_optimizer)
        self.save_hyperparameters()
        encoder = create_backbone(backbone, in_chans=in_chans, pretrained=pretrained, weights=weights)
        children = list(encoder.trunk.named_children())
        names = [n for n, _ in children]
        if cut not in names[:-1]:
            raise HSLError(f"SplitClassifier cut '{cut}' is not a top-level layer of {backbone} before its last one; "
                           f"choose one of: {', '.join(names[:-1])}.")
        k = names.index(cut) + 1
        site = nn.Sequential(_Normalize(encoder.mean, encoder.std), *[m for _, m in children[:k]])
        server = nn.Sequential(*[m for _, m in children[k:]])
        _check_split(encoder, site, server, in_chans, backbone)
        self.sites = nn.ModuleList([site])
        self.server = nn.Sequential(server, nn.Dropout(dropout), nn.Linear(encoder.num_features, 1))
        self.traffic_bytes = 0  # feature maps + labels sent and gradients received by sites while training
        self.set_sites(sites)

    def set_sites(self, count: int) -> None:
        """Give ``count`` sites their own copy of the site part (all start from the same weights)."""
        if count < 1:
            raise HSLError(f"SplitClassifier needs at least one site, got {count}.")
        first = self.sites[0]
        self.sites = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(count - 1)])
        self.hparams["sites"] = count  # so a checkpoint rebuilds as many site parts

    def forward(self, image: torch.Tensor, node: torch.Tensor | None = None) -> torch.Tensor:
        if node is None:
            node = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        if int(node.max()) >= len(self.sites):
            raise HSLError(f"SplitClassifier has {len(self.sites)} site part(s) but a batch comes from node "
                           f"{int(node.max())}; the splitavg strategy sets one per node.")
        order, parts = [], []
        for s in torch.unique(node).tolist():
            idx = (node == s).nonzero(as_tuple=True)[0]
            order.append(idx)
            parts.append(self.sites[s](image[idx]))
        features = torch.cat(parts)  # the server's batch: every site's feature maps, concatenated
        if self.training:
            labels = image.shape[0] * 8  # int64 labels travel with the feature maps
            self.traffic_bytes += 2 * features.numel() * features.element_size() + labels
        logits = self.server(features).squeeze(1)
        return logits[torch.argsort(torch.cat(order))]  # back to the batch's order

    def training_loss(self, batch: dict):
        logits = self(batch["image"], batch.get("node"))
        return F.binary_cross_entropy_with_logits(logits.float(), batch["label"].float()), {}

    def primary_logits(self, batch: dict) -> torch.Tensor:
        return self(batch["image"], batch.get("node"))


def _check_split(encoder, site: nn.Module, server: nn.Module, in_chans: int, backbone: str) -> None:
    """The two parts run one after the other must compute the backbone's own forward."""
    was_training = encoder.training
    encoder.eval(), site.eval(), server.eval()
    x = torch.rand(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = encoder(x), server(site(x))
    encoder.train(was_training), site.train(was_training), server.train(was_training)
    if expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-5):
        raise HSLError(f"{backbone} cannot be split into top-level layers run in sequence (its forward does more "
                       "than chain them); use a ResNet-style backbone for splitavg.")
