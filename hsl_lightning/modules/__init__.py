"""LightningModules: HSLModule (primary + SAT), ClassifierModule (single-task baselines), FoundationProbe,
SplitClassifier (SplitAVG)."""

from hsl_lightning.modules.base import BinaryTaskModule
from hsl_lightning.modules.classifier import ClassifierModule
from hsl_lightning.modules.foundation import FoundationProbe
from hsl_lightning.modules.hsl import HSLModule
from hsl_lightning.modules.split import SplitClassifier

__all__ = ["BinaryTaskModule", "ClassifierModule", "FoundationProbe", "HSLModule", "SplitClassifier"]
