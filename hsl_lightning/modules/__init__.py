"""LightningModules: HSLModule (primary + SAT), ClassifierModule (single-task baselines), FoundationProbe."""

from hsl_lightning.modules.base import BinaryTaskModule
from hsl_lightning.modules.classifier import ClassifierModule
from hsl_lightning.modules.foundation import FoundationProbe
from hsl_lightning.modules.hsl import HSLModule

__all__ = ["BinaryTaskModule", "ClassifierModule", "FoundationProbe", "HSLModule"]
