"""hsl_lightning: HeteroSync Learning on PyTorch Lightning.

The pieces, each in its own room: ``models`` (timm backbones, the MMoE), ``modules``
(LightningModules), ``data`` (sources, heterogeneity, the federated data module),
``federation`` (the Fabric orchestrator; ``federation.strategies``, one file per strategy family),
``inference`` (using a trained model: checkpoints, ``hsl test``, ``hsl predict``), ``benchmark``,
``metrics``, ``cli``.
"""

import importlib

from hsl_lightning.errors import HSLError

__version__ = "0.1.0"
# The public classes, imported on first use (PEP 562): ``import hsl_lightning.errors`` or a Flower
# ClientApp that only forwards messages must not pay for torch, Lightning and timm.
_LAZY = {
    **dict.fromkeys(["DicomFolders", "ExternalSite", "FederatedDataModule", "ImageFolders", "MedMNIST", "Scenario", "SyntheticAnchor",
                     "SyntheticLesions"], "hsl_lightning.data"),
    "Federation": "hsl_lightning.federation",
    "DifferentialPrivacy": "hsl_lightning.federation.privacy",
    **dict.fromkeys(["ClassifierModule", "FoundationProbe", "HSLModule", "SplitClassifier"], "hsl_lightning.modules"),
}
__all__ = [*_LAZY, "HSLError"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hsl_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
