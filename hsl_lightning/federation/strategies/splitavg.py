"""SplitAVG (Zhang, Qu, Singh, Kalpathy-Cramer and Rubin, "SplitAVG: A heterogeneity-aware federated
deep learning method for medical imaging", IEEE JBHI 26(9), 2022).

Rule: the network is split at a cut layer; each site keeps its site part, and a server part trains
on the concatenated feature maps of all sites. Feature maps cross the sites' boundaries, not weights.
"""

from __future__ import annotations

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.strategies.base import Strategy, register


@register
class SplitAVG(Strategy):
    """SplitAVG (Zhang, Qu, Singh, Kalpathy-Cramer and Rubin, "SplitAVG: A heterogeneity-aware
    federated deep learning method for medical imaging", IEEE JBHI 26(9), 2022).

    The network is split at a cut layer (:class:`~hsl_lightning.modules.SplitClassifier`): each
    institution keeps its own site part; the server part is trained on the concatenation of all
    institutions' feature maps, so it fits one model to the union of the data distributions (the
    paper's "network split and feature map concatenation"). All institutions train together,
    step by step, so the whole federation is one trainee (on rank 0).

    **This method sends feature maps, not only weights**: every step, each institution sends the
    feature maps of its images at the cut and their labels, and receives their gradient. The run
    logs these bytes per round (``bytes_features_round``). No weights are exchanged.

    Choices, where the paper (abstract) and the authors' code (github.com/zm17943/SplitAVG) leave
    them open or differ from exact split training: cut ``conv1`` by default, as in their code;
    site parts are never averaged, as in their code; each site receives the exact gradient of its
    own slice (their code sends one gradient averaged over the sites' slices). A step's batch holds
    the same number of images from every site (``site_batch: fixed``, as their code draws it:
    data.batch_size split evenly, at least one image per site, an epoch as many steps as the pooled
    data would make), or is drawn from the union of the sites' training sets, each contributing
    in proportion to its size (``site_batch: proportional``, what this library did before).
    """

    name = "splitavg"
    description = ("SplitAVG (Zhang et al. 2022): site parts stay local, a server part trains on all sites' "
                   "concatenated feature maps (sends feature maps)")

    def __init__(self, site_batch: str = "fixed"):
        if site_batch not in ("fixed", "proportional"):
            raise HSLError(f"splitavg site_batch must be fixed or proportional, got '{site_batch}'.")
        self.site_batch = site_batch

    def plan(self, num_nodes):
        return [tuple(range(num_nodes))]

    def shared_keys(self, module):
        return []

    def loader_options(self):
        return {"per_node_batch": self.site_batch == "fixed"}

    def setup(self, module, num_nodes):
        if not hasattr(module, "set_sites"):
            raise HSLError("splitavg trains a split network: use model class_path hsl_lightning.SplitClassifier "
                           "(see configs/methods/splitavg.yaml).")
        module.set_sites(num_nodes)

    def traffic(self, module):
        sent, module.traffic_bytes = module.traffic_bytes, 0
        return sent
