"""Personal layers: some layers never leave the node; the rest is averaged.

- FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
  Normalization", ICLR 2021): BatchNorm layers stay local.
- FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019): the head
  stays local, the base is FedAvg-averaged.
- FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated
  Learning", ICML 2021): the head stays local; locally the head trains first, then the body.
"""

from __future__ import annotations

from torch import nn

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.strategies.base import Strategy, head_prefixes, register


def _prefixed_keys(module: nn.Module, predicate) -> set[str]:
    keys = set()
    for prefix, sub in module.named_modules():
        if predicate(prefix, sub):
            keys.update(f"{prefix}.{k}" if prefix else k for k in sub.state_dict())
    return keys


@register
class FedBN(Strategy):
    """FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization", ICLR 2021): every BatchNorm layer (affine weights and running statistics)
    stays local; the rest is averaged. Choice: averaged with FedAvg's size weights (the paper's
    experiments use equal-sized clients, where the two coincide)."""

    name = "fedbn"
    description = "FedBN (Li et al. 2021): BatchNorm weights and statistics stay local, the rest is size-weighted mean"
    size_weighted = True

    def shared_keys(self, module):
        local = _prefixed_keys(module, lambda _, m: isinstance(m, nn.modules.batchnorm._BatchNorm))
        return [k for k in module.state_dict() if k not in local]


@register
class FedPer(Strategy):
    """FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019):
    base layers are averaged FedAvg-style, the personalisation layers stay local. Which layers
    are personal is the module's ``head_prefixes`` (the classifier head; HSL's task towers)."""

    name = "fedper"
    description = "FedPer (Arivazhagan et al. 2019): shared base layers (size-weighted mean), personal head stays local"
    size_weighted = True

    def shared_keys(self, module):
        prefixes = head_prefixes(module, self.name)
        return [k for k in module.state_dict() if not k.startswith(prefixes)]


@register
class FedRep(Strategy):
    """FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated
    Learning", ICML 2021, Algorithm 1): the representation (body) is averaged, each node keeps its
    head. Locally a node first trains only its head for ``local_epochs - body_epochs`` epochs with
    the body frozen, then only the body for ``body_epochs`` epochs with the head frozen. The head is
    the module's ``head_prefixes``. Aggregation: unweighted mean of the bodies, as in the paper."""

    name = "fedrep"
    description = ("FedRep (Collins et al. 2021): shared body (unweighted mean), personal head; locally head "
                   "epochs first, then body epochs")

    def __init__(self, body_epochs: int = 1):
        if body_epochs < 1:
            raise HSLError(f"fedrep body_epochs must be at least 1, got {body_epochs}.")
        self.body_epochs = body_epochs
        self._trainable: dict[str, bool] = {}  # requires_grad before local training, restored after

    def shared_keys(self, module):
        prefixes = head_prefixes(module, self.name)
        return [k for k in module.state_dict() if not k.startswith(prefixes)]

    def begin_local(self, module, trainee):
        self._trainable = {name: p.requires_grad for name, p in module.named_parameters()}

    def begin_epoch(self, module, epoch, num_epochs):
        if num_epochs <= self.body_epochs:
            raise HSLError(f"fedrep trains the head before the body: it needs local_epochs > body_epochs "
                           f"({self.body_epochs}), got local_epochs={num_epochs}.")
        train_head = epoch < num_epochs - self.body_epochs
        prefixes = head_prefixes(module, self.name)
        for name, p in module.named_parameters():
            p.requires_grad_(self._trainable[name] and name.startswith(prefixes) == train_head)

    def end_local(self, module, trainee, steps, optimizer):
        for name, p in module.named_parameters():
            p.requires_grad_(self._trainable[name])
        return None

    def abort_local(self, module, trainee):
        if self._trainable:  # begin_local ran
            self.end_local(module, trainee, 0, None)
