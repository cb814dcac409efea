"""Data: sources (synthetic, MedMNIST, image folders, DICOM), heterogeneity, the federated data module, the site check."""

from hsl_lightning.data.base import ImageSet, Source
from hsl_lightning.data.datamodule import FederatedDataModule, NodeData
from hsl_lightning.data.dicom import DicomFolders
from hsl_lightning.data.folders import ImageFolders
from hsl_lightning.data.heterogeneity import Acquisition, ExternalSite, Scenario
from hsl_lightning.data.medmnist import MedMNIST
from hsl_lightning.data.synthetic import SyntheticAnchor, SyntheticLesions

__all__ = ["ImageSet", "Source", "FederatedDataModule", "NodeData", "ImageFolders", "DicomFolders", "Acquisition", "ExternalSite", "Scenario",
           "MedMNIST", "SyntheticAnchor", "SyntheticLesions"]
