"""Synchronisation: the shared state as one flat vector, merged by one weighted all-reduce.

Each rank adds ``weight * state`` of the institutions it hosts into one float64 vector whose last
element is the sum of weights; one all-reduce (sum) over ranks then gives the numerator and the
denominator of the weighted mean. Accumulating in float64 makes the result independent of how
institutions are spread over ranks up to float32 rounding.

Integer buffers (BatchNorm's ``num_batches_tracked``) are averaged like the rest and rounded to
the nearest integer: the merged model has seen the (weighted) mean number of batches.
"""

from __future__ import annotations

import weakref

import torch


class StatePacker:
    """Maps the ``keys`` entries of a state dict to one float64 vector and back."""

    def __init__(self, template: dict[str, torch.Tensor], keys: list[str]):
        self.keys = list(keys)
        self.shapes = [template[k].shape for k in self.keys]
        self.dtypes = [template[k].dtype for k in self.keys]
        self.sizes = [template[k].numel() for k in self.keys]
        self.numel = sum(self.sizes)
        #: bytes one institution sends per synchronisation: the entries in their own dtype
        self.nbytes = sum(template[k].numel() * template[k].element_size() for k in self.keys)
        # (vector, its unpacked state) of the last ``representable`` result: every node loads the
        # merged state of a round, so it is unpacked once (vectors are replaced, never edited in place)
        self._last: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._views: tuple[weakref.ref, list[torch.Tensor]] | None = None  # accumulate's views of its ``out``

    def pack(self, state: dict[str, torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
        if not self.keys:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.cat([state[k].detach().reshape(-1).to(device=device, dtype=torch.float64) for k in self.keys])

    @torch.no_grad()
    def accumulate(self, out: torch.Tensor, state: dict[str, torch.Tensor], weight: float) -> None:
        """``out += weight * pack(state)`` without building the packed vector (``out``: float64), in
        one foreach call: a round adds every institution's state into the same ``out``, whose
        per-entry views are made once."""
        if not self.keys:
            return
        views = self._views[1] if self._views is not None and self._views[0]() is out else None
        if views is None:
            views = [chunk.view(shape) for chunk, shape in zip(out.split(self.sizes), self.shapes)]
            self._views = (weakref.ref(out), views)
        values = [state[k] for k in self.keys]
        if any(v.device != out.device for v in values):
            values = [v.to(out.device) for v in values]
        torch._foreach_add_(views, values, alpha=weight)

    def mask(self, selected: set[str]) -> torch.Tensor:
        """Which entries of the flat vector belong to the ``selected`` keys."""
        if not self.keys:
            return torch.zeros(0, dtype=torch.bool)
        return torch.cat([torch.full((n,), k in selected, dtype=torch.bool) for k, n in zip(self.keys, self.sizes)])

    def representable(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` rounded to what the entries' own dtypes hold (what a node actually receives), so
        a checkpoint of the unpacked state restores it exactly."""
        state = self.unpack(flat)
        out = self.pack(state, flat.device)
        self._last = (out, state)
        return out

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._last is not None and flat is self._last[0]:
            return dict(self._last[1])
        out = {}
        for key, chunk, shape, dtype in zip(self.keys, flat.split(self.sizes), self.shapes, self.dtypes):
            value = chunk.reshape(shape)
            out[key] = value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)
        return out


def all_reduce_sum(fabric, vector: torch.Tensor) -> torch.Tensor:
    """Sum ``vector`` over all ranks (a no-op on one rank)."""
    if fabric is None or fabric.world_size == 1:
        return vector
    return fabric.all_reduce(vector, reduce_op="sum")
