"""Train N institutions' models of one architecture as one: ``torch.func`` over stacked weights.

Simulating a federation trains N copies of a model (one per institution) on their own batches.
Run one after another, small models at small image sizes leave a GPU idle between kernel
launches. :class:`FusedModels` stacks the N models' parameters and buffers along a new leading
dimension (``torch.func.stack_module_state``) and runs the architecture once under
``torch.vmap(torch.func.functional_call)`` on inputs shaped ``(N, B, ...)``:

* every launch serves all N institutions (vmap's batching rules turn a convolution with batched
  weights into one grouped convolution with ``groups * N``, a Linear into a batched matmul, a
  BatchNorm into one BatchNorm over ``N * C`` channels);
* the stacked parameters are ordinary leaf tensors; ``loss.sum()`` over institutions gives each
  institution's slice exactly the gradient of its own loss, and elementwise optimizers (SGD,
  Adam, AdamW, also ``foreach``/``capturable``) on the stacked tensors do what N separate
  optimizers would do;
* BatchNorm buffers are stacked too and passed with ``in_dims=0``, so each institution keeps and
  updates its own running statistics, in place in the stacked buffer, as in sequential training;
* the whole step (forward, backward, optimizer) can be captured in one CUDA graph.

Why vmap and not a hand-written "grouped" ResNet (Conv2d with ``groups * N`` over channel-stacked
inputs): vmap produces that same grouped computation from any architecture (timm backbones, the
HSL network with its MMoE, dropout with independent masks per institution via
``randomness="different"``), with no per-architecture conversion code to keep in step with timm,
and the N modules' own ``state_dict`` names map one to one onto the stacked tensors.

Usage::

    fused = FusedModels(models)                      # N modules, same architecture
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-3, foreach=True)
    losses = fused.train_step(x, y, opt)             # x (N, B, C, H, W), y (N, B); losses (N,)
    fused.unstack()                                  # write weights back into the N modules
    fused.load_from(models)                          # ... and read them in again (e.g. after FedAvg)
    fused = FusedModels.from_states(model, states)   # or: N state_dicts of one module (the Federation's way)
    opt = fused.optimizer_like(model.configure_optimizers(), model)   # that optimizer, over the stack

For other losses: ``fused.map(lambda m, batch: m.training_loss(batch)[0], batch)`` with every
tensor of ``batch`` shaped ``(N, B, ...)`` returns the ``(N,)`` losses.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state


def _signature(model: nn.Module) -> list[tuple]:
    """What must agree between models: submodule types and names, parameter and buffer shapes and dtypes."""
    sig: list[tuple] = [("module", name, type(m).__name__) for name, m in model.named_modules()]
    sig += [("parameter", n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()]
    sig += [("buffer", n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()]
    return sig


def _check_same_architecture(models: Sequence[nn.Module]) -> None:
    if len(models) == 0:
        raise ValueError("FusedModels needs at least one model; got an empty list.")
    ref = _signature(models[0])
    for i, m in enumerate(models[1:], start=1):
        sig = _signature(m)
        if sig == ref:
            continue
        for a, b in zip(ref, sig):
            if a != b:
                raise ValueError(
                    f"The models differ in architecture, so they cannot be fused: model 0 has {a[0]} '{a[1]}' "
                    f"{a[2:]}, model {i} has {b[0]} '{b[1]}' {b[2:]}. Build every institution's model from the same "
                    "configuration."
                )
        longer, idx = (ref, 0) if len(ref) > len(sig) else (sig, i)
        extra = longer[min(len(ref), len(sig))]
        raise ValueError(
            f"The models differ in architecture, so they cannot be fused: only model {idx} has {extra[0]} "
            f"'{extra[1]}'. Build every institution's model from the same configuration."
        )
    devices = {p.device for m in models for p in m.parameters()} | {b.device for m in models for b in m.buffers()}
    if len(devices) > 1:
        raise ValueError(f"The models are on different devices ({sorted(map(str, devices))}); move them to one first.")


class _Apply(nn.Module):
    """Lets ``functional_call`` run any function of the module, not only its forward."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.m = inner
        self.fn: Callable | None = None

    def forward(self, *args):
        return self.fn(self.m, *args)


def _batchnorm_in_fp32(module: nn.Module) -> None:
    """Run every BatchNorm of the (code-only) copy in float32 when its input is bf16/fp16.

    Under vmap the stacked BatchNorm takes CUDA's native kernel, which wants the input in the
    dtype of the float32 running statistics (cuDNN's, used without vmap, accepts mixed dtypes); so
    under autocast the input is upcast, normalised, and cast back."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def forward(x, _forward=m.forward):
                if x.dtype in (torch.float16, torch.bfloat16):
                    with torch.autocast(x.device.type, enabled=False):
                        return _forward(x.float()).to(x.dtype)
                return _forward(x)
            m.forward = forward


class FusedModels:
    """N models of one architecture, trained as one through ``torch.vmap`` (see the module docstring).

    ``models``: the N institutions' modules (same architecture, same device). Their current
    weights and buffers are copied into stacked tensors; the modules themselves are not used again
    until :meth:`unstack` writes the stacked state back into them.
    """

    def __init__(self, models: Sequence[nn.Module]):
        models = list(models)
        _check_same_architecture(models)
        params, buffers = stack_module_state(models)
        self._setup(models, params, buffers)

    @classmethod
    def from_states(cls, module: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> "FusedModels":
        """N institutions as one, from N ``state_dict``s of ``module``'s architecture (no N modules
        needed). ``module`` provides the code, and the entries the states lack (non-persistent
        buffers), the same for every institution; it is not changed."""
        states = list(states)
        if not states:
            raise ValueError("FusedModels.from_states needs at least one state; got none.")
        n = len(states)

        def room(own: torch.Tensor) -> torch.Tensor:  # filled by load_states below
            return own.detach().new_empty((n, *own.shape))

        params = {k: room(v).requires_grad_(v.requires_grad) for k, v in module.named_parameters()}
        buffers = {k: room(v) for k, v in module.named_buffers()}
        fused = cls.__new__(cls)
        fused._setup([module] * n, params, buffers)
        fused.load_states(module, states)
        return fused

    def _setup(self, models: list[nn.Module], params: dict, buffers: dict) -> None:
        self.models = models
        self.n = len(models)
        # Leaf tensors an optimizer can step; the stacked buffers are updated in place (BatchNorm).
        self.params: dict[str, torch.Tensor] = {
            k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()
        }
        self.buffers: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in buffers.items()}
        # A stateless copy that only provides the code and the non-tensor attributes.
        self._apply = _Apply(copy.deepcopy(models[0]).to("meta"))
        self._apply.train(models[0].training)
        _batchnorm_in_fp32(self._apply)

    # --- modes and state
    @property
    def training(self) -> bool:
        return self._apply.m.training

    def train(self, mode: bool = True) -> "FusedModels":
        self._apply.train(mode)
        return self

    def eval(self) -> "FusedModels":
        return self.train(False)

    def parameters(self) -> list[torch.Tensor]:
        """The stacked parameters (leading dimension N) that require gradients: hand them to an optimizer."""
        return [p for p in self.params.values() if p.requires_grad]

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.params.items())

    @torch.no_grad()
    def unstack(self, models: Sequence[nn.Module] | None = None) -> list[nn.Module]:
        """Copy the stacked parameters and buffers into the N modules (those given at construction by
        default), in place; returns the modules."""
        models = self.models if models is None else list(models)
        if len(models) != self.n:
            raise ValueError(f"unstack needs {self.n} models, got {len(models)}.")
        for i, m in enumerate(models):
            for name, p in m.named_parameters():
                p.copy_(self.params[name][i])
            for name, b in m.named_buffers():
                b.copy_(self.buffers[name][i])
        return models

    @torch.no_grad()
    def load_from(self, models: Sequence[nn.Module] | None = None) -> None:
        """Copy the N modules' parameters and buffers into the stacked tensors, in place (their memory,
        and so optimizer state and captured CUDA graphs, stay valid)."""
        models = self.models if models is None else list(models)
        if len(models) != self.n:
            raise ValueError(f"load_from needs {self.n} models, got {len(models)}.")
        _check_same_architecture([self.models[0], *models])
        for i, m in enumerate(models):
            for name, p in m.named_parameters():
                self.params[name][i].copy_(p)
            for name, b in m.named_buffers():
                self.buffers[name][i].copy_(b)

    @torch.no_grad()
    def load_states(self, module: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> None:
        """Write N ``state_dict``s of ``module``'s architecture into the stacked tensors, in place (as
        :meth:`from_states` builds them: entries the states lack come from ``module``). The tensors'
        memory, and so an optimizer over them and a captured CUDA graph, stay valid."""
        states = list(states)
        if len(states) != self.n:
            raise ValueError(f"load_states needs {self.n} states, got {len(states)}.")
        for name, own in list(module.named_parameters()) + list(module.named_buffers()):
            target = self.params[name] if name in self.params else self.buffers[name]
            if name not in states[0]:
                target.copy_(own.detach().expand_as(target))
                continue
            missing = [i for i, state in enumerate(states) if name not in state]
            if missing:
                raise ValueError(f"State {missing[0]} has no entry '{name}'; every state must be a state_dict of the "
                                 "same architecture.")
            values = [state[name] for state in states]
            if all(v is values[0] for v in values):  # e.g. every institution received the merged state
                target.copy_(values[0].expand_as(target))
            elif all(v.dtype == target.dtype and v.device == target.device for v in values):
                torch.stack(values, out=target)  # one launch, not one per institution
            else:
                for i, value in enumerate(values):
                    target[i].copy_(value)

    @torch.no_grad()
    def state_dicts(self, indices: Sequence[int] | None = None, copy: bool = True) -> list[dict[str, torch.Tensor]]:
        """One ``state_dict`` per institution (detached copies), keyed as the modules' own; only those
        of ``indices`` when given. ``copy=False``: views of the stacked tensors instead, valid until
        the next step or load changes them."""
        ref = self.models[0]
        # state_dict keys -> the stacked tensor's name (tied weights appear under several keys).
        by_id = {id(t): n for n, t in list(ref.named_parameters()) + list(ref.named_buffers())}
        keys = {k: by_id[id(v)] for k, v in ref.state_dict(keep_vars=True).items() if id(v) in by_id}
        stacked = {**self.params, **self.buffers}
        indices = range(self.n) if indices is None else indices
        if not copy:
            return [{k: stacked[name][i].detach() for k, name in keys.items()} for i in indices]
        return [{k: stacked[name][i].clone() for k, name in keys.items()} for i in indices]

    # Optimizers whose update of a parameter depends on that parameter's own elements only, so one
    # instance over the stacked tensors does what one instance per institution would do.
    ELEMENTWISE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad")

    @classmethod
    def check_optimizer(cls, optimizer: torch.optim.Optimizer) -> None:
        """Raise ValueError unless ``optimizer`` can step stacked parameters (see ELEMENTWISE_OPTIMIZERS)."""
        kind = type(optimizer)
        if kind.__name__ not in cls.ELEMENTWISE_OPTIMIZERS or kind.__module__.split(".")[:2] != ["torch", "optim"]:
            raise ValueError(f"{kind.__name__} cannot train fused institutions: only torch's elementwise optimizers "
                             f"({', '.join(cls.ELEMENTWISE_OPTIMIZERS)}) update each institution's slice of a "
                             "stacked parameter as its own optimizer would.")

    def optimizer_like(self, optimizer: torch.optim.Optimizer, module: nn.Module,
                       capturable: bool = False) -> torch.optim.Optimizer:
        """An optimizer of ``optimizer``'s type, parameter groups and settings over the stacked
        parameters; ``optimizer`` was configured on ``module`` (the architecture's parameters).
        ``capturable``: set torch's ``capturable`` flag where the type has one (CUDA graph capture)."""
        self.check_optimizer(optimizer)
        kind = type(optimizer)
        name_of = {id(p): n for n, p in module.named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            unknown = [p for p in group["params"] if id(p) not in name_of]
            if unknown:
                raise ValueError("The optimizer holds parameters that are not the module's own; configure it on the "
                                 "module's parameters.")
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [self.params[name_of[id(p)]] for p in group["params"]]})
        accepted = inspect.signature(kind).parameters
        settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        if capturable and "capturable" in accepted:
            settings["capturable"] = True
            for group in groups:
                group["capturable"] = True
        return kind(groups, **settings)

    # --- computation
    def map(self, fn: Callable[..., Any], *args: Any, randomness: str = "different") -> Any:
        """``fn(module, *args)`` for every institution at once: each tensor in ``args`` (nested in
        dicts/lists/tuples as well) has the institutions along dimension 0; so has every output.
        ``randomness``: dropout masks per institution (``different``) or shared (``same``)."""
        apply = self._apply
        names_p = list(self.params)
        names_b = list(self.buffers)

        def one(params, buffers, *a):
            state = {"m." + k: v for k, v in params.items()}
            state.update({"m." + k: v for k, v in buffers.items()})
            return functional_call(apply, state, a, tie_weights=True, strict=True)

        apply.fn = fn
        try:
            params = {k: self.params[k] for k in names_p}
            buffers = {k: self.buffers[k] for k in names_b}
            return torch.vmap(one, in_dims=(0, 0, *[0] * len(args)), randomness=randomness)(params, buffers, *args)
        finally:
            apply.fn = None

    def forward(self, x: torch.Tensor, *args: Any) -> Any:
        """The models' forward on ``x`` shaped ``(N, B, ...)``: outputs shaped ``(N, B, ...)``."""
        return self.map(lambda m, *a: m(*a), x, *args)

    __call__ = forward

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy with logits (mean over each institution's batch): shape ``(N,)``."""
        if x.shape[0] != self.n or y.shape[0] != self.n:
            raise ValueError(f"Inputs must have the {self.n} institutions along dimension 0; got x {tuple(x.shape)}, "
                             f"y {tuple(y.shape)}.")

        def loss(m, xi, yi):
            logits = m(xi)
            if logits.shape != yi.shape and logits.numel() == yi.numel():
                logits = logits.reshape(yi.shape)  # (B, 1) logits against (B,) labels
            dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: loss in fp32
            return F.binary_cross_entropy_with_logits(logits.to(dtype), yi.to(dtype))

        return self.map(loss, x, y)

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """One step for all institutions: BCE-with-logits per institution, summed (so each institution's
        gradient is that of its own loss), backward, and ``optimizer.step()`` when an optimizer is given
        (its gradients are reset first, to None). Returns the ``(N,)`` losses, detached; no host sync, so
        the step can be captured in a CUDA graph."""
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        losses = self.losses(x, y)
        losses.sum().backward()
        if optimizer is not None:
            optimizer.step()
        return losses.detach()


def check_resettable(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless :func:`reset_optimizer_state` can give ``optimizer`` a fresh state in
    place: one of :attr:`FusedModels.ELEMENTWISE_OPTIMIZERS`, and SGD only without dampening (its first
    momentum buffer is the raw gradient, which a zeroed buffer reproduces only when dampening is 0)."""
    FusedModels.check_optimizer(optimizer)
    if type(optimizer).__name__ == "SGD" and any(g["momentum"] and g["dampening"] for g in optimizer.param_groups):
        raise ValueError("SGD with momentum and dampening cannot be reset in place for CUDA graphs (its first "
                         "momentum buffer is the raw gradient): set dampening to 0.")


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give ``optimizer`` the state a fresh instance would take its next step from, in place: the
    state tensors keep their memory (a CUDA graph that captured the optimizer's step stays valid).
    Zeroed, except NAdam's ``mu_product`` (1) and Adagrad's ``sum`` (its initial value); see
    :func:`check_resettable`."""
    kind = type(optimizer).__name__
    zeros = []  # zeroed in one foreach call (a few launches, not one per state tensor)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    optimizer.state[p][key] = type(value)(0)
                elif kind == "NAdam" and key == "mu_product":
                    value.fill_(1.0)
                elif kind == "Adagrad" and key == "sum":
                    value.fill_(group["initial_accumulator_value"])
                else:
                    zeros.append(value)
    if zeros:
        torch._foreach_zero_(zeros)


class FusedTrainer:
    """The training step of N fused institutions, kept from round to round.

    ``loss(module, batch)`` is one institution's loss; :meth:`step` takes a batch with the
    institutions along dimension 0 and a boolean ``mask`` (N,): every institution's loss is
    computed, only the masked-in ones reach the backward pass (an institution that has taken all
    its steps idles), and the optimizer steps. :meth:`load` starts a new round: new weights and a
    fresh optimizer state, written in place.

    With ``cuda_graph`` (CUDA only) the first :meth:`step` warms the step up on a side stream,
    captures it (forward, masked backward, optimizer) in one CUDA graph, and puts the weights and
    the optimizer back where they were; every step after that, in this and later rounds, copies
    the batch into the graph's input tensors and replays it. Needs a resettable optimizer
    (:func:`check_resettable`). If capture fails, the trainer warns and runs eagerly.
    """

    def __init__(self, module: nn.Module, states: Sequence[dict[str, torch.Tensor]],
                 optimizer: torch.optim.Optimizer, loss: Callable[[nn.Module, dict], torch.Tensor], *,
                 cuda_graph: bool = False, autocast: Callable[[], Any] | None = None,
                 backward: Callable[[torch.Tensor], None] | None = None):
        if cuda_graph:
            check_resettable(optimizer)
        self.fused = FusedModels.from_states(module, states)
        self.optimizer = self.fused.optimizer_like(optimizer, module, capturable=cuda_graph)
        self.loss = loss
        self.cuda_graph = cuda_graph
        self.autocast = autocast or contextlib.nullcontext
        self.backward = backward or torch.Tensor.backward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None  # why capture failed, when it did
        self._inputs: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._losses: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.fused.n

    def load(self, module: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> None:
        """Start over from ``states`` (N state_dicts of ``module``) with a fresh optimizer state."""
        self.fused.load_states(module, states)
        self._fresh_optimizer()

    def _fresh_optimizer(self) -> None:
        if self.graph is not None:
            reset_optimizer_state(self.optimizer)  # the graph holds the state tensors' memory
        else:
            self.optimizer.state.clear()  # the next step starts the state afresh, as a new optimizer would

    def _compute(self, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            losses = self.fused.map(self.loss, batch)
        self.backward(torch.where(mask, losses, torch.zeros_like(losses)).sum())
        self.optimizer.step()
        return losses.detach()

    def step(self, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """One step; returns the (N,) losses (with ``cuda_graph``, the graph's output tensor: read it
        before the next step)."""
        if self.cuda_graph and self.graph is None:
            self._capture(batch, mask)
        if self.graph is None:
            return self._compute(batch, mask)
        for key, value in batch.items():
            self._inputs[key].copy_(value, non_blocking=True)
        self._mask.copy_(mask, non_blocking=True)
        self.graph.replay()
        return self._losses

    def _capture(self, batch: dict, mask: torch.Tensor) -> None:
        tensors = list(self.fused.params.values()) + list(self.fused.buffers.values())
        saved = [t.detach().clone() for t in tensors]
        self._inputs = {k: v.clone() for k, v in batch.items()}
        self._mask = mask.clone()
        benchmark = torch.backends.cudnn.benchmark
        # The graph keeps the convolution algorithms chosen while it is captured for every replay, so
        # cuDNN times its candidates for these shapes once, here (the global setting is put back after).
        torch.backends.cudnn.benchmark = True
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a capturable optimizer run outside a graph (warm-up only)
                for _ in range(3):  # allocates the optimizer's state, picks kernels
                    self._compute(self._inputs, self._mask)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._losses = self._compute(self._inputs, self._mask)
            self.graph = graph
        except Exception as exc:  # noqa: BLE001 - any capture failure: train eagerly instead
            self.cuda_graph, self.graph_error = False, f"{type(exc).__name__}: {exc}"
            warnings.warn(f"CUDA graph capture of the fused step failed ({self.graph_error}); training these "
                          "institutions without a graph.", stacklevel=3)
            self._inputs, self._mask, self._losses = {}, None, None
        finally:
            torch.backends.cudnn.benchmark = benchmark
        with torch.no_grad():  # the warm-up steps must not count
            for t, s in zip(tensors, saved):
                t.copy_(s)
        self._fresh_optimizer()
