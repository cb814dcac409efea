"""Contrastive: a node's local loss adds a contrastive term on its representations.

- MOON (Li, He and Song, "Model-Contrastive Federated Learning", CVPR 2021, Eq. 3-4): pull the
  local representation towards the received global model's, away from the node's previous model's.
- FedRCL (Seo, Kim, Kim and Han, "Relaxed Contrastive Learning for Federated Learning",
  CVPR 2024): a supervised contrastive term with a divergence penalty on multi-level features.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.strategies.base import Strategy, register


@register
class Moon(Strategy):
    """MOON (Li, He and Song, "Model-Contrastive Federated Learning", CVPR 2021, Eq. 3-4).

    The local loss adds mu * l_con with
        l_con = -log( e^{sim(z, z_glob)/tau} / (e^{sim(z, z_glob)/tau} + e^{sim(z, z_prev)/tau}) ),
    where z is the representation of the model being trained, z_glob that of the model the node
    received this round and z_prev that of the node's own model after its previous round (the
    received model in the first round), sim the cosine similarity. Both reference models are frozen
    copies in eval mode. z is the output of the module's ``representation_layer()`` (the pooled
    encoder feature; the paper adds a projection head, which we leave out), taken from the training
    forward itself, so BatchNorm statistics move once per step as with every other method; z_glob
    and z_prev come from ``representation(batch)`` of the frozen copies. Aggregation as FedAvg.
    """

    name = "moon"
    reads_last_epoch = True  # the node's "previous model" is its last epoch's
    description = "MOON (Li et al. 2021): contrastive term pulls local representations to the global model's"
    size_weighted = True

    def __init__(self, mu: float = 1.0, temperature: float = 0.5):
        if mu < 0 or temperature <= 0:
            raise HSLError(f"moon needs mu >= 0 and temperature > 0, got mu={mu}, temperature={temperature}.")
        self.mu, self.temperature = mu, temperature
        self._previous_states: dict[int, dict[str, torch.Tensor]] = {}  # per hosted node, kept across rounds
        self._global = self._previous = None
        self._hook = None
        self._z: torch.Tensor | None = None  # the training forward's representation of the current batch

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        twin = copy.deepcopy(module).eval()
        for p in twin.parameters():
            p.requires_grad_(False)
        return twin

    def begin_local(self, module, trainee):
        if not hasattr(module, "representation") or not hasattr(module, "representation_layer"):
            raise HSLError(f"moon needs the module's representation(batch) and representation_layer(); "
                           f"{type(module).__name__} lacks them.")
        self._global = self._frozen_copy(module)  # copied before the hook below, so the copies carry none
        self._previous = self._frozen_copy(module)
        if trainee in self._previous_states:
            self._previous.load_state_dict(self._previous_states[trainee])

        def keep(_, __, output):
            if module.training:  # the training forward, not an evaluation inside the round
                self._z = output

        self._hook = module.representation_layer().register_forward_hook(keep)

    def contrastive_loss(self, z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
        """MOON's l_con, the batch mean of
        -log(e^{sim(z, z_glob)/tau} / (e^{sim(z, z_glob)/tau} + e^{sim(z, z_prev)/tau}))."""
        sims = torch.stack([F.cosine_similarity(z, z_glob, dim=1), F.cosine_similarity(z, z_prev, dim=1)], dim=1)
        target = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)  # the global model is the positive
        return F.cross_entropy(sims / self.temperature, target)

    def local_loss(self, module, batch):
        z, self._z = self._z, None
        if self.mu == 0:
            return None
        if z is None:
            raise HSLError(f"moon: the training forward of {type(module).__name__} did not run its "
                           "representation_layer(), so there is no representation to contrast.")
        with torch.no_grad():
            z_glob, z_prev = self._global.representation(batch), self._previous.representation(batch)
        return self.mu * self.contrastive_loss(z, z_glob, z_prev)

    def end_local(self, module, trainee, steps, optimizer):
        self._previous_states[trainee] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.abort_local(module, trainee)
        return None

    def abort_local(self, module, trainee):
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._z, self._global, self._previous = None, None, None, None

    def state_dict(self):
        return {"previous": dict(self._previous_states)}

    def load_state_dict(self, state):
        self._previous_states = dict(state["previous"])



def _hardest(sim: torch.Tensor, mask: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest (or smallest) similarities among ``mask``ed entries, and which exist."""
    fill = -torch.inf if largest else torch.inf
    k = min(k, sim.shape[1])
    values = sim.masked_fill(~mask, fill).topk(k, dim=1, largest=largest).values
    return values, torch.isfinite(values)


@register
class FedRCL(Strategy):
    """FedRCL (Seo, Kim, Kim and Han, "Relaxed Contrastive Learning for Federated Learning",
    CVPR 2024), in the form of the authors' implementation (github.com/skynbe/FedRCL,
    ``utils/loss.py``; the authors explain in their issue #1 that the penalty of the paper's RCL
    loss is implemented as a contrastive term whose positive similarity is the constant 1).

    The local loss adds, averaged over the backbone's feature levels (its stem and stages, pooled and
    L2-normalised, s_ij the cosine similarity, tau the temperature):

    - supervised contrastive term: for each anchor i, its hardest positive p (least similar
      sample of its class, itself if it has no classmate in the batch) against its ``negatives``
      most similar samples of the other class:
      -log( e^{s_ip/tau} / (e^{s_ip/tau} + sum_k e^{s_ik/tau}) );
    - divergence penalty: with m_i the similarity of the least similar other sample of i's class,
      s~_i = m_i if m_i >= ``threshold`` else -1 (no classmate: -1), the term
      -log( e^{1/tau} / (e^{1/tau} + e^{s~_i/tau}) ): it pushes apart classes whose samples have
      all collapsed together, which is the "relaxation" of plain supervised contrastive learning.

    Weights 1 and 1, tau = 0.05, threshold 0.7, negatives 2 are the authors' defaults. The levels
    are the stem and stages the timm backbone lists in ``feature_info``, tapped before their last
    activation (``tap: pre_activation``, as the authors' ResNet returns them; for a timm ResNet the
    input of the stem's ReLU and of each stage's last block's final ReLU), or at the stage outputs
    (``tap: post_activation``, what this library did before). The cross-entropy is the module's own
    BCE. Aggregation: unweighted mean, as in the authors' server.
    """

    name = "fedrcl"
    description = ("FedRCL (Seo et al. 2024): supervised contrastive term with a divergence penalty on "
                   "multi-level features in the local loss; unweighted mean")

    def __init__(self, scl_weight: float = 1.0, penalty_weight: float = 1.0, temperature: float = 0.05,
                 threshold: float = 0.7, negatives: int = 2, tap: str = "pre_activation"):
        if tap not in ("pre_activation", "post_activation"):
            raise HSLError(f"fedrcl tap must be pre_activation or post_activation, got '{tap}'.")
        self.tap = tap
        if temperature <= 0 or negatives < 1 or scl_weight < 0 or penalty_weight < 0:
            raise HSLError("fedrcl needs temperature > 0, negatives >= 1 and non-negative weights, got "
                           f"temperature={temperature}, negatives={negatives}, scl_weight={scl_weight}, "
                           f"penalty_weight={penalty_weight}.")
        self.scl_weight, self.penalty_weight = scl_weight, penalty_weight
        self.temperature, self.threshold, self.negatives = temperature, threshold, negatives
        self._hooks: list = []
        self._levels: list[torch.Tensor] = []

    def begin_local(self, module, trainee):
        if not hasattr(module, "feature_levels"):
            raise HSLError(f"fedrcl needs the module's feature levels; {type(module).__name__} has none "
                           "(use hsl_lightning.ClassifierModule, see configs/methods/fedrcl.yaml).")
        self._levels = []

        def add(x):
            if x.requires_grad:  # a training forward, not an evaluation
                # pooled at once: an in-place activation overwrites x right after a pre-hook
                self._levels.append(F.normalize(x.float().mean(dim=(2, 3)), dim=1))

        if self.tap == "post_activation":
            self._hooks = [m.register_forward_hook(lambda _, __, out: add(out)) for m in module.feature_levels()]
        else:
            self._hooks = [_last_activation(m).register_forward_pre_hook(lambda _, inputs: add(inputs[0]))
                           for m in module.feature_levels()]

    def rcl_loss(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contrastive term, penalty) for normalised features ``z`` (B, d) of one level."""
        tau = self.temperature
        sim = z @ z.T
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
        pos, _ = _hardest(sim, same, 1, largest=False)  # includes i itself: at worst s_ii = 1
        neg, has_neg = _hardest(sim, ~same, self.negatives, largest=True)
        logits = torch.cat([pos, neg.masked_fill(~has_neg, -torch.inf)], dim=1) / tau
        contrastive = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
        least, has_mate = _hardest(sim, same & ~eye, 1, largest=False)
        relaxed = torch.where(has_mate & (least >= self.threshold), least, torch.full_like(least, -1.0))[:, 0]
        penalty = F.softplus((relaxed - 1.0) / tau).mean()  # = -log(e^{1/tau} / (e^{1/tau} + e^{s~/tau}))
        return contrastive, penalty

    def local_loss(self, module, batch):
        levels, self._levels = self._levels, []
        if not levels:
            return None
        terms = [self.rcl_loss(z, batch["label"]) for z in levels]
        contrastive = sum(c for c, _ in terms) / len(terms)
        penalty = sum(p for _, p in terms) / len(terms)
        return self.scl_weight * contrastive + self.penalty_weight * penalty

    def end_local(self, module, trainee, steps, optimizer):
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._levels = [], []
        return None

    def abort_local(self, module, trainee):
        self.end_local(module, trainee, 0, None)


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Hardswish, nn.Mish, nn.PReLU)


def _last_activation(level: nn.Module) -> nn.Module:
    """The last activation module registered in ``level`` (itself, if it is one): for timm's
    ResNets the stage output's ReLU, so its input is the stage's pre-activation output."""
    found = [m for m in level.modules() if isinstance(m, ACTIVATIONS)]
    if not found:
        raise HSLError(f"fedrcl tap pre_activation found no activation module in feature level "
                       f"{type(level).__name__}; set strategy_options tap: post_activation.")
    return found[-1]
