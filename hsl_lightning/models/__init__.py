"""Networks: timm backbones, the MMoE auxiliary architecture of HSL."""

from hsl_lightning.models.backbones import Backbone, create_backbone
from hsl_lightning.models.mmoe import MMoE, HSLNetwork, HSLOutput

__all__ = ["Backbone", "create_backbone", "MMoE", "HSLNetwork", "HSLOutput"]
