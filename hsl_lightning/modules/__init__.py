"""LightningModules: HSLModule (primary + SAT) and ClassifierModule (single-task baselines)."""

from hsl_lightning.modules.base import BinaryTaskModule
from hsl_lightning.modules.classifier import ClassifierModule
from hsl_lightning.modules.hsl import HSLModule

__all__ = ["BinaryTaskModule", "ClassifierModule", "HSLModule"]
