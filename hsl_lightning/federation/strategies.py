"""Strategies: what institutions share after each round and how it is merged.

A strategy answers a few questions and nothing else, so a new method is a small class here,
not a change to the orchestrator loop:

- ``plan``: which institutions train together (one model per node; ``central``: one for all);
- ``shared_keys``: which state entries cross an institution's boundary;
- ``weight``: each institution's weight in the all-reduced sum;
- ``combine``: the node's next shared state from its own contribution and the reduced sum
  (the weighted mean, unless the method personalises);
- local-training hooks, called by the Federation around each institution's local training:
  ``begin_local`` / ``begin_epoch`` / ``local_loss`` (an extra loss term, e.g. FedProx) /
  ``after_backward`` (e.g. SCAFFOLD's gradient correction) / ``end_local``, which may return a
  vector to be summed over institutions in the same all-reduce as the weights, handed back to
  ``after_round`` (e.g. SCAFFOLD's control-variate updates).
"""

from __future__ import annotations

import copy
import inspect
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hsl_lightning.errors import HSLError, suggest

Contribution = Literal["best", "last"]


class Strategy:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: which local state a node contributes: its best epoch of the round by local validation AUC, or its last
    default_contribution: ClassVar[Contribution] = "last"
    #: whether ``combine`` depends on the node's own contribution (then each node keeps its own shared state)
    personal: ClassVar[bool] = False
    #: whether each node also trains and deploys a whole model of its own (Ditto), besides the shared one
    personal_model: ClassVar[bool] = False
    #: weight each node by its training-set size in the merge (FedAvg's rule); else all weigh 1
    size_weighted: ClassVar[bool] = False

    def options(self) -> dict:
        """The strategy's settings (its constructor's arguments), for logs and configs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def plan(self, num_nodes: int) -> list[tuple[int, ...]]:
        return [(i,) for i in range(num_nodes)]

    def shared_keys(self, module: nn.Module) -> list[str]:
        return list(module.state_dict())

    def weight(self, n_train: int) -> float:
        return float(n_train) if self.size_weighted else 1.0

    def combine(self, own: torch.Tensor, total: torch.Tensor, own_weight: float, total_weight: float) -> torch.Tensor:
        return total / total_weight

    # --- local-training hooks (all optional) ------------------------------------------
    def begin_local(self, module: nn.Module, trainee: int) -> None:
        """An institution starts a round's local training, its model holding what it received."""

    def begin_epoch(self, module: nn.Module, epoch: int, num_epochs: int) -> None:
        """A local epoch starts."""

    def local_loss(self, module: nn.Module, batch: dict) -> torch.Tensor | None:
        """An extra term added to every local training step's loss (None: nothing)."""
        return None

    def after_backward(self, module: nn.Module) -> None:
        """Gradients are computed; the optimizer steps next."""

    def extra_size(self, module: nn.Module) -> int:
        """Length of the vector ``end_local`` returns (0: none)."""
        return 0

    def end_local(self, module: nn.Module, trainee: int, steps: int, optimizer) -> torch.Tensor | None:
        """Local training ended after ``steps`` optimizer steps; optionally return a float64
        vector of ``extra_size`` to be summed over all institutions."""
        return None

    def after_round(self, extra_total: torch.Tensor | None, num_trainees: int) -> None:
        """The round's all-reduce is done; ``extra_total`` is the sum of ``end_local`` vectors."""

    def begin_personal(self, module: nn.Module, trainee: int, received: dict[str, torch.Tensor]) -> None:
        """(``personal_model`` strategies) the node's own model is loaded and about to train;
        ``received`` is the state the node received this round."""

    def end_personal(self, module: nn.Module, trainee: int) -> None:
        """(``personal_model`` strategies) the node's own model finished this round's training."""


class HSL(Strategy):
    name = "hsl"
    description = ("HeteroSync Learning sync: unweighted mean of every state entry (encoders, experts, gates, "
                   "towers, BatchNorm statistics); each node contributes its best epoch of the round")
    default_contribution = "best"


class FedAvg(Strategy):
    name = "fedavg"
    description = "FedAvg (McMahan et al. 2017): mean of every state entry weighted by each node's training-set size"
    size_weighted = True


class Swarm(Strategy):
    name = "swarm"
    description = ("Swarm Learning (Warnat-Herresthal et al. 2021): decentralised unweighted mean of every entry, "
                   "no server; the HSL sync without the SAT")


class Local(Strategy):
    name = "local"
    description = "Local learning: every node trains alone, nothing is shared (lower bound)"

    def shared_keys(self, module):
        return []


class Central(Strategy):
    name = "central"
    description = "Central learning: one model on all nodes' pooled training data (upper bound; moves data)"

    def plan(self, num_nodes):
        return [tuple(range(num_nodes))]

    def shared_keys(self, module):
        return []


class Personalized(Strategy):
    """The HSL paper's Personalized Learning baseline: w_i <- 0.5 w_i + 0.5 mean_{j != i} w_j.

    The mean of the others is recovered from the all-reduced sum: (sum - w_i) / (N - 1). With a
    single node there are no others and the node keeps its own weights.
    """

    name = "personalized"
    description = "Personalized Learning (HSL paper baseline): each node keeps 0.5 own + 0.5 mean of the other nodes"
    personal = True

    def combine(self, own, total, own_weight, total_weight):
        if total_weight - own_weight <= 0:
            return own.clone()
        others = (total - own_weight * own) / (total_weight - own_weight)
        return 0.5 * own + 0.5 * others


def _proximal_term(anchor: list[tuple[torch.Tensor, torch.Tensor]], coef: float) -> torch.Tensor | None:
    """coef/2 * sum ||p - p_anchor||^2 over (parameter, anchor) pairs; None when there is nothing to add."""
    if not anchor or coef == 0:
        return None
    return 0.5 * coef * sum(((p - a) ** 2).sum() for p, a in anchor)


class FedProx(Strategy):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2).

    Each node minimises h_k(w) = F_k(w) + mu/2 * ||w - w^t||^2, where w^t is the model it received
    at the start of the round; aggregation is FedAvg's (weighted by training-set size). The
    proximal term covers every trainable parameter (BatchNorm statistics are buffers, not in it).
    """

    name = "fedprox"
    description = "FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 in the local loss"
    size_weighted = True

    def __init__(self, mu: float = 0.01):
        if mu < 0:
            raise HSLError(f"fedprox mu must be non-negative, got {mu}.")
        self.mu = mu
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_local(self, module, trainee):
        self._anchor = [(p, p.detach().clone()) for p in module.parameters() if p.requires_grad]

    def local_loss(self, module, batch):
        return _proximal_term(self._anchor, self.mu)


def _prefixed_keys(module: nn.Module, predicate) -> set[str]:
    keys = set()
    for prefix, sub in module.named_modules():
        if predicate(prefix, sub):
            keys.update(f"{prefix}.{k}" if prefix else k for k in sub.state_dict())
    return keys


def _head_prefixes(module: nn.Module, strategy: str) -> tuple[str, ...]:
    prefixes = tuple(getattr(module, "head_prefixes", ()))
    if not prefixes:
        raise HSLError(f"{strategy} needs the module to name its personal layers: {type(module).__name__} has no "
                       "head_prefixes.")
    return prefixes


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


class FedPer(Strategy):
    """FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019):
    base layers are averaged FedAvg-style, the personalisation layers stay local. Which layers
    are personal is the module's ``head_prefixes`` (the classifier head; HSL's task towers)."""

    name = "fedper"
    description = "FedPer (Arivazhagan et al. 2019): shared base layers (size-weighted mean), personal head stays local"
    size_weighted = True

    def shared_keys(self, module):
        prefixes = _head_prefixes(module, self.name)
        return [k for k in module.state_dict() if not k.startswith(prefixes)]


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
        prefixes = _head_prefixes(module, self.name)
        return [k for k in module.state_dict() if not k.startswith(prefixes)]

    def begin_local(self, module, trainee):
        self._trainable = {name: p.requires_grad for name, p in module.named_parameters()}

    def begin_epoch(self, module, epoch, num_epochs):
        if num_epochs <= self.body_epochs:
            raise HSLError(f"fedrep trains the head before the body: it needs local_epochs > body_epochs "
                           f"({self.body_epochs}), got local_epochs={num_epochs}.")
        train_head = epoch < num_epochs - self.body_epochs
        prefixes = _head_prefixes(module, self.name)
        for name, p in module.named_parameters():
            p.requires_grad_(self._trainable[name] and name.startswith(prefixes) == train_head)

    def end_local(self, module, trainee, steps, optimizer):
        for name, p in module.named_parameters():
            p.requires_grad_(self._trainable[name])
        return None


class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020, Algorithm 1 with option II, all nodes every round, global step size 1).

    Node i corrects every local gradient by its control variate: y <- y - lr (g(y) - c_i + c);
    after K local steps, c_i+ = c_i - c + (x - y) / (K lr), where x is the model it received.
    The models are averaged unweighted and c <- c + mean_i (c_i+ - c_i): the control-variate
    deltas ride in the same all-reduce as the weights (so a node sends twice the parameters).
    The correction is applied to the gradient before the module's optimizer step; the paper's
    analysis assumes plain SGD (``model.optimizer: sgd``, as ``configs/methods/scaffold.yaml`` sets).
    """

    name = "scaffold"
    description = "SCAFFOLD (Karimireddy et al. 2020): control variates correct each local gradient for client drift"

    def __init__(self):
        self._c: torch.Tensor | None = None  # the global control variate, identical on every rank
        self._ci: dict[int, torch.Tensor] = {}  # per hosted node
        self._params: list[nn.Parameter] = []
        self._x: torch.Tensor | None = None
        self._correction: list[torch.Tensor] = []

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def extra_size(self, module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def begin_local(self, module, trainee):
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._x = self._flat().clone()
        if self._c is None:
            self._c = torch.zeros_like(self._x)
        ci = self._ci.setdefault(trainee, torch.zeros_like(self._x))
        self._correction = list((self._c - ci).split([p.numel() for p in self._params]))

    def after_backward(self, module):
        for p, corr in zip(self._params, self._correction):
            if p.grad is not None:
                p.grad.add_(corr.view_as(p))

    def end_local(self, module, trainee, steps, optimizer):
        lr = optimizer.param_groups[0]["lr"]
        old = self._ci[trainee]
        new = old - self._c + (self._x - self._flat()) / (max(1, steps) * lr)
        self._ci[trainee] = new
        return (new - old).double()

    def after_round(self, extra_total, num_trainees):
        self._c = self._c + (extra_total / num_trainees).to(self._c.dtype)


class Moon(Strategy):
    """MOON (Li, He and Song, "Model-Contrastive Federated Learning", CVPR 2021, Eq. 3-4).

    The local loss adds mu * l_con with
        l_con = -log( e^{sim(z, z_glob)/tau} / (e^{sim(z, z_glob)/tau} + e^{sim(z, z_prev)/tau}) ),
    where z is the representation of the model being trained, z_glob that of the model the node
    received this round and z_prev that of the node's own model after its previous round (the
    received model in the first round), sim the cosine similarity. Both reference models are frozen
    copies. The representation is the module's ``representation(batch)`` (the pooled encoder
    feature; the paper adds a projection head, which we leave out). Aggregation as FedAvg.
    """

    name = "moon"
    description = "MOON (Li et al. 2021): contrastive term pulls local representations to the global model's"
    size_weighted = True

    def __init__(self, mu: float = 1.0, temperature: float = 0.5):
        if mu < 0 or temperature <= 0:
            raise HSLError(f"moon needs mu >= 0 and temperature > 0, got mu={mu}, temperature={temperature}.")
        self.mu, self.temperature = mu, temperature
        self._previous_states: dict[int, dict[str, torch.Tensor]] = {}  # per hosted node, kept across rounds
        self._global = self._previous = None

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        twin = copy.deepcopy(module).eval()
        for p in twin.parameters():
            p.requires_grad_(False)
        return twin

    def begin_local(self, module, trainee):
        if not hasattr(module, "representation"):
            raise HSLError(f"moon needs the module's representation(batch); {type(module).__name__} has none.")
        self._global = self._frozen_copy(module)
        self._previous = self._frozen_copy(module)
        if trainee in self._previous_states:
            self._previous.load_state_dict(self._previous_states[trainee])

    def contrastive_loss(self, z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
        sims = torch.stack([F.cosine_similarity(z, z_glob, dim=1), F.cosine_similarity(z, z_prev, dim=1)], dim=1)
        target = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)  # the global model is the positive
        return F.cross_entropy(sims / self.temperature, target)

    def local_loss(self, module, batch):
        if self.mu == 0:
            return None
        z = module.representation(batch)
        with torch.no_grad():
            z_glob, z_prev = self._global.representation(batch), self._previous.representation(batch)
        return self.mu * self.contrastive_loss(z, z_glob, z_prev)

    def end_local(self, module, trainee, steps, optimizer):
        self._previous_states[trainee] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self._global = self._previous = None
        return None


class Ditto(Strategy):
    """Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021, Algorithm 1 and Eq. 2).

    Each round a node (1) trains the received global model w^t on its data as in FedAvg and
    contributes it (size-weighted mean), then (2) trains its own model v_k on
    F_k(v) + lambda/2 ||v - w^t||^2 for the same number of local epochs; it deploys v_k. Choice:
    lambda = 0.1 by default (the paper tunes it per data set); v_k starts from w^1 in the first round.
    """

    name = "ditto"
    description = "Ditto (Li et al. 2021): FedAvg global model plus a personal model kept near it by lambda/2 ||v - w||^2"
    size_weighted = True
    personal_model = True

    def __init__(self, lam: float = 0.1):
        if lam < 0:
            raise HSLError(f"ditto lam must be non-negative, got {lam}.")
        self.lam = lam
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_personal(self, module, trainee, received):
        self._anchor = [(p, received[name].to(p.device)) for name, p in module.named_parameters() if p.requires_grad]

    def local_loss(self, module, batch):
        return _proximal_term(self._anchor, self.lam)  # no anchor during the shared model's plain pass

    def end_personal(self, module, trainee):
        self._anchor = []


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
        prefixes = _head_prefixes(module, self.name)
        return [k for k in module.state_dict() if k.startswith(prefixes)]


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s
    for s in (HSL, FedAvg, Swarm, Personalized, FedProx, Scaffold, Moon, FedBN, FedPer, FedRep, Ditto, Foundation,
              Local, Central)
}


def get_strategy(strategy: str | Strategy, options: dict | None = None) -> Strategy:
    """A strategy by name (``options``: its constructor's keyword arguments, e.g. ``{"mu": 0.1}``)."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise HSLError(f"Unknown strategy '{strategy}'.{suggest(strategy, STRATEGIES)} "
                       f"Available: {', '.join(STRATEGIES)}.")
    cls = STRATEGIES[strategy]
    options = dict(options or {})
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise HSLError(f"Strategy '{strategy}' has no option {', '.join(unknown)}; "
                       f"it takes: {', '.join(accepted) or 'no options'}.")
    return cls(**options)
