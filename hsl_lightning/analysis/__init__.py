"""Analyses of trained federations: how homogeneous the nodes' representations are."""

from hsl_lightning.analysis.homogeneity import embed, extract, homogeneity, mean_pairwise_mmd, node_separability

__all__ = ["embed", "extract", "homogeneity", "mean_pairwise_mmd", "node_separability"]
