"""The strategy base class and the registry: what institutions share after each round and how it is merged.

A strategy answers a few questions and nothing else, so a new method is a small class here,
not a change to the orchestrator loop:

- ``plan``: which institutions train together (one model per node; ``central``: one for all);
- ``shared_keys``: which state entries cross an institution's boundary;
- ``weight``: each institution's weight in the all-reduced sum;
- ``merge_kind``: the kind of merge (:mod:`~hsl_lightning.federation.merge`): ``Mean`` (the weighted
  mean, the default), ``Personal`` (``combine``: each node's next shared state from its own
  contribution and the reduced sum) or ``Server`` (``aggregate``: a server rule that needs every
  node's contribution, not only their sum, e.g. FedCOME);
- local-training hooks, called by the Federation around each institution's local training:
  ``begin_local`` / ``begin_epoch`` / ``local_loss`` (an extra loss term, e.g. FedProx) /
  ``after_backward`` (e.g. SCAFFOLD's gradient correction) / ``end_local``, which may return a
  vector to be summed over institutions in the same all-reduce as the weights, handed back to
  ``after_round`` (e.g. SCAFFOLD's control-variate updates);
- ``setup``: adapt the module to the federation once, before training (SplitAVG's site parts);
- ``traffic``: bytes that crossed institution boundaries during the round besides the state
  (SplitAVG's feature maps);
- ``state_dict`` / ``load_state_dict``: per-node state kept across rounds (control variates,
  previous models), saved in every round's checkpoint.

A class becomes a strategy by the :func:`register` decorator (``hsl strategies`` lists them in
the order they are registered). Strategies that override none of the local-training hooks
(:meth:`Strategy.local_hooks`) can train institutions fused (``fuse_institutions``).

Each built-in strategy lives in a file of this package with its family; this one holds what they share.
"""

from __future__ import annotations

import inspect
from typing import ClassVar, Literal

import torch
import yaml
from torch import nn

from hsl_lightning.errors import HSLError, suggest
from hsl_lightning.federation.merge import Mean, Merge

Contribution = Literal["best", "last"]


def local_hook(hook):
    """Marks a method of :class:`Strategy` as a hook on one institution's own local training."""
    hook.local_hook = True
    return hook


class Strategy:
    """What institutions share after each round and how it is merged; the base of every strategy.

    A subclass sets ``name`` and ``description``, overrides only the questions its method answers
    differently (see the module docstring) and is made known by :func:`register`. The defaults are
    the unweighted mean of every state entry, each node contributing its last local epoch.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: which local state a node contributes: its best epoch of the round by local validation AUC, or its last
    default_contribution: ClassVar[Contribution] = "last"
    #: how the round's contributions are merged: Mean, Personal (``combine``) or Server (``aggregate``)
    merge_kind: ClassVar[type[Merge]] = Mean
    #: whether each node also trains and deploys a whole model of its own (Ditto), besides the shared one
    personal_model: ClassVar[bool] = False
    #: weight each node by its training-set size in the merge (FedAvg's rule); else all weigh 1
    size_weighted: ClassVar[bool] = False
    #: ``end_local`` reads the module's weights after the last local epoch (so a node contributing
    #: its best epoch instead would pair one epoch's weights with another's strategy state)
    reads_last_epoch: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        old = [name for name in ("personal", "server_aggregates") if name in vars(cls)]
        if old:  # the flags that merge_kind replaced: a strategy setting them would silently take the mean
            raise TypeError(f"{cls.__name__} sets {', '.join(old)}, which no longer exist: set merge_kind = Personal "
                            "(for combine) or merge_kind = Server (for aggregate), from "
                            "hsl_lightning.federation.merge.")

    @classmethod
    def local_hooks(cls) -> list[str]:
        """The hooks on local training (marked ``@local_hook`` below) that this strategy overrides."""
        hooks = [name for name, value in vars(Strategy).items() if getattr(value, "local_hook", False)]
        return [name for name in hooks if getattr(cls, name) is not getattr(Strategy, name)]

    @classmethod
    def fusable(cls) -> bool:
        """Whether a rank's institutions can train as one model: nothing acts on one institution's training."""
        return not cls.local_hooks() and not cls.personal_model

    @classmethod
    def concurrent(cls) -> bool:
        """Whether a rank's institutions can train at the same time in threads, each in its own copy of
        the module: no local-training hooks (they keep a trainee's state in the strategy object) and no
        traffic read from the module after the round."""
        return not cls.local_hooks() and cls.traffic is Strategy.traffic

    def options(self) -> dict:
        """The strategy's settings (its constructor's arguments), for logs and configs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def plan(self, num_nodes: int) -> list[tuple[int, ...]]:
        """Which nodes train together, as trainees: by default each node alone."""
        return [(i,) for i in range(num_nodes)]

    def shared_keys(self, module: nn.Module) -> list[str]:
        """The state entries that cross a node's boundary each round: by default all of them."""
        return list(module.state_dict())

    def weight(self, n_train: int) -> float:
        """A node's weight in the merge: its training-set size when ``size_weighted``, else 1."""
        return float(n_train) if self.size_weighted else 1.0

    def combine(self, own: torch.Tensor, total: torch.Tensor, own_weight: float, total_weight: float) -> torch.Tensor:
        """(``Personal`` merges) a node's next shared state from its own contribution and the sum."""
        return total / total_weight

    def setup(self, module: nn.Module, num_nodes: int) -> None:
        """Adapt the module to a federation of ``num_nodes`` nodes, once, before anything is copied."""

    def aggregate(self, received: torch.Tensor, contributions: torch.Tensor, sizes: torch.Tensor,
                  is_param: torch.Tensor) -> torch.Tensor:
        """(``Server`` merges) the next shared state from the state every node received
        (d,), each node's contribution (N, d), training-set sizes (N,) and which of the d entries are
        trainable parameters (the rest are buffers such as BatchNorm statistics)."""
        raise NotImplementedError

    def loader_options(self) -> dict:
        """Keyword arguments for the data module's ``train_loader`` (e.g. SplitAVG's fixed batch per site)."""
        return {}

    def secure_sum_problem(self, trainees: int, numel: int) -> str | None:
        """Why this strategy cannot be merged from the (securely aggregated) sum of the contributions
        alone, or None when it can: its merge is a weighted mean and its message carries nothing else."""
        if numel == 0 or trainees < 2:
            return "nothing is shared"
        if not issubclass(self.merge_kind, Mean):
            return f"its merge ({self.merge_kind.__name__}) needs more than the sum of the contributions"
        if type(self).traffic is not Strategy.traffic:
            return "its message carries feature maps' traffic besides the states"
        return None

    def traffic(self, module: nn.Module) -> int:
        """Bytes that crossed institution boundaries this round besides the shared state and
        ``end_local`` vectors (0 for weight-sharing methods); called once per round, after training."""
        return 0

    def state_dict(self) -> dict:
        """Per-node state that must survive across rounds (saved in checkpoints); tensors, numbers,
        strings and dicts / lists of them only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    # --- local-training hooks (all optional) ------------------------------------------
    @local_hook
    def begin_local(self, module: nn.Module, trainee: int) -> None:
        """An institution starts a round's local training, its model holding what it received."""

    @local_hook
    def begin_epoch(self, module: nn.Module, epoch: int, num_epochs: int) -> None:
        """A local epoch starts."""

    @local_hook
    def local_loss(self, module: nn.Module, batch: dict) -> torch.Tensor | None:
        """An extra term added to every local training step's loss (None: nothing)."""
        return None

    @local_hook
    def after_backward(self, module: nn.Module) -> None:
        """Gradients are computed; the optimizer steps next."""

    def extra_size(self, module: nn.Module) -> int:
        """Length of the vector ``end_local`` returns (0: none)."""
        return 0

    @local_hook
    def end_local(self, module: nn.Module, trainee: int, steps: int, optimizer) -> torch.Tensor | None:
        """Local training ended after ``steps`` optimizer steps; optionally return a float64
        vector of ``extra_size`` to be summed over all institutions."""
        return None

    def abort_local(self, module: nn.Module, trainee: int) -> None:
        """Local training failed part-way (the node is dropped from the round): undo what
        ``begin_local`` set up; the node's per-round state is not updated."""

    def after_round(self, extra_total: torch.Tensor | None, num_trainees: int) -> None:
        """The round's all-reduce is done; ``extra_total`` is the sum of ``end_local`` vectors
        (of the nodes that finished the round); ``num_trainees`` counts all nodes."""

    @local_hook
    def begin_personal(self, module: nn.Module, trainee: int, received: dict[str, torch.Tensor]) -> None:
        """(``personal_model`` strategies) the node's own model is loaded and about to train;
        ``received`` is the state the node received this round."""

    @local_hook
    def end_personal(self, module: nn.Module, trainee: int) -> None:
        """(``personal_model`` strategies) the node's own model finished this round's training."""


#: every registered strategy by name, in the order of registration
STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` a strategy, known by ``cls.name`` (to ``hsl strategies``, configs
    and :func:`get_strategy`)."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or not cls.name:
        raise TypeError(f"register takes a Strategy subclass with a name, got {cls!r}.")
    taken = STRATEGIES.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"Strategy name '{cls.name}' is taken by {taken.__module__}.{taken.__qualname__}.")
    STRATEGIES[cls.name] = cls
    return cls



def head_prefixes(module: nn.Module, strategy: str) -> tuple[str, ...]:
    """The module's personal layers (its ``head_prefixes``), or a clear error naming ``strategy``."""
    prefixes = tuple(getattr(module, "head_prefixes", ()))
    if not prefixes:
        raise HSLError(f"{strategy} needs the module to name its personal layers: {type(module).__name__} has no "
                       "head_prefixes.")
    return prefixes



def get_strategy(strategy: str | Strategy, options: dict | None = None) -> Strategy:
    """A strategy by name (``options``: its constructor's keyword arguments, e.g. ``{"mu": 0.1}``)."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise HSLError(f"Unknown strategy '{strategy}'.{suggest(strategy, STRATEGIES)} "
                       f"Available: {', '.join(STRATEGIES)}.")
    cls = STRATEGIES[strategy]
    # ``--federation.strategy_options.mu 0.1`` reaches us as the string "0.1": read such values as
    # YAML scalars, as a config file would have given them (a word stays a string).
    options = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in (options or {}).items()}
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise HSLError(f"Strategy '{strategy}' has no option {', '.join(unknown)}; "
                       f"it takes: {', '.join(accepted) or 'no options'}.")
    return cls(**options)
