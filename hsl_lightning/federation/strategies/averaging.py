"""Averaging: strategies whose whole rule is which state is averaged, and with which weights.

- HSL ("Addressing data heterogeneity in distributed medical imaging with HeteroSync Learning",
  Nature Communications 16, 9416, 2025): the unweighted mean of every state entry;
  each node contributes its best local epoch of the round.
- FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
  Data", AISTATS 2017): w <- sum_k n_k w_k / sum_k n_k.
- Swarm Learning (Warnat-Herresthal et al., Nature 2021): w <- mean_k w_k, with no server.
- Personalized Learning (the HSL paper's baseline): w_i <- 0.5 w_i + 0.5 mean_{j != i} w_j.
- Foundation: a frozen pretrained encoder and a linear probe; the probe is FedAvg-averaged (or not shared).
- Local (nothing is shared) and Central (one model on the pooled data): the lower and upper bounds.
"""

from __future__ import annotations

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.merge import Personal
from hsl_lightning.federation.strategies.base import Strategy, head_prefixes, register


@register
class HSL(Strategy):
    """HeteroSync Learning's sync: the unweighted mean of every state entry (encoders, experts, gates,
    towers, BatchNorm statistics); each node contributes its best local epoch of the round."""

    name = "hsl"
    description = ("HeteroSync Learning sync: unweighted mean of every state entry (encoders, experts, gates, "
                   "towers, BatchNorm statistics); each node contributes its best epoch of the round")
    default_contribution = "best"


@register
class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): w <- sum_k n_k w_k / sum_k n_k over every state entry, n_k being
    node k's training-set size."""

    name = "fedavg"
    description = "FedAvg (McMahan et al. 2017): mean of every state entry weighted by each node's training-set size"
    size_weighted = True


@register
class Swarm(Strategy):
    """Swarm Learning (Warnat-Herresthal et al. 2021): w <- mean_k w_k over every entry, decentralised
    (no server); HSL's sync without the SAT."""

    name = "swarm"
    description = ("Swarm Learning (Warnat-Herresthal et al. 2021): decentralised unweighted mean of every entry, "
                   "no server; the HSL sync without the SAT")


@register
class Personalized(Strategy):
    """The HSL paper's Personalized Learning baseline: w_i <- 0.5 w_i + 0.5 mean_{j != i} w_j.

    The mean of the others is recovered from the all-reduced sum: (sum - w_i) / (N - 1). With a
    single node there are no others and the node keeps its own weights.
    """

    name = "personalized"
    description = "Personalized Learning (HSL paper baseline): each node keeps 0.5 own + 0.5 mean of the other nodes"
    merge_kind = Personal

    def combine(self, own, total, own_weight, total_weight):
        if total_weight - own_weight <= 0:
            return own.clone()
        others = (total - own_weight * own) / (total_weight - own_weight)
        return 0.5 * own + 0.5 * others



@register
class Foundation(Strategy):
    """Foundation-model baseline: a frozen pretrained encoder (``FoundationProbe``, the CLIP image
    tower by default) with a linear probe, federated (size-weighted mean of the probe: only the
    head crosses the boundary) or per node (``federated: false``: nothing is shared)."""

    name = "foundation"
    description = "Frozen pretrained encoder (CLIP image tower by default) + linear probe, federated or per node"
    size_weighted = True

    def __init__(self, federated: bool = True):
        self.federated = federated

    def shared_keys(self, module):
        if not any(p.requires_grad for p in module.parameters()) or all(p.requires_grad for p in module.parameters()):
            raise HSLError("foundation trains a frozen encoder's linear probe: use model class_path "
                           "hsl_lightning.FoundationProbe (see configs/methods/foundation.yaml).")
        if not self.federated:
            return []
        prefixes = head_prefixes(module, self.name)
        return [k for k in module.state_dict() if k.startswith(prefixes)]


@register
class Local(Strategy):
    """Local learning, the lower bound: every node trains alone and nothing is shared."""

    name = "local"
    description = "Local learning: every node trains alone, nothing is shared (lower bound)"

    def shared_keys(self, module):
        return []


@register
class Central(Strategy):
    """Central learning, the upper bound: one model trained on all nodes' pooled training data (it moves
    the data, which federated methods do not)."""

    name = "central"
    description = "Central learning: one model on all nodes' pooled training data (upper bound; moves data)"

    def plan(self, num_nodes):
        return [tuple(range(num_nodes))]

    def shared_keys(self, module):
        return []
