"""hsl_lightning: HeteroSync Learning on PyTorch Lightning.

The pieces, each in its own room: ``models`` (timm backbones, the MMoE), ``modules``
(LightningModules), ``data`` (sources, heterogeneity, the federated data module),
``federation`` (the Fabric orchestrator; ``federation.strategies``, one file per strategy family),
``inference`` (using a trained model: checkpoints, ``hsl test``, ``hsl predict``), ``benchmark``,
``metrics``, ``cli``.
"""

from hsl_lightning.data import (ExternalSite, FederatedDataModule, ImageFolders, MedMNIST, Scenario, SyntheticAnchor,
                                SyntheticLesions)
from hsl_lightning.errors import HSLError
from hsl_lightning.federation import Federation
from hsl_lightning.federation.privacy import DifferentialPrivacy
from hsl_lightning.modules import ClassifierModule, FoundationProbe, HSLModule, SplitClassifier

__version__ = "0.1.0"
__all__ = ["ExternalSite", "FederatedDataModule", "ImageFolders", "MedMNIST", "Scenario", "SyntheticAnchor",
           "SyntheticLesions", "HSLError", "Federation", "DifferentialPrivacy", "ClassifierModule", "FoundationProbe", "HSLModule",
           "SplitClassifier"]
