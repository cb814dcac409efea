"""The round's message: the one float64 vector every rank all-reduces, read and written by name.

Each rank adds what its trainees contribute; one sum over ranks (:func:`~.sync.all_reduce_sum`)
then holds, in named slices:

============  ==============================================================================
``state``     the weighted sum of the trainees' shared states (the merge's numerator)
``extras``    the sum of strategy vectors (``Strategy.end_local``: SCAFFOLD's control-variate
              updates); empty for other strategies
``traffic``   bytes that crossed institution boundaries besides the state (SplitAVG's feature maps)
``finished``  one slot per trainee: 1 if it finished the round (a dropped trainee adds nothing)
``weight``    the sum of the finished trainees' weights (the merge's denominator)
============  ==============================================================================

Nothing else crosses a rank's boundary during the merge (``tests/test_privacy.py`` rebuilds the
message from the trainees' states by these names). Accumulating in float64 makes the sum
independent of how trainees are spread over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsl_lightning.federation import sync


@dataclass(frozen=True)
class MessageLayout:
    """Lengths of the message's parts: the packed shared state, the strategy extras, the trainees."""

    state: int
    extras: int
    trainees: int

    @property
    def size(self) -> int:
        return self.state + self.extras + 1 + self.trainees + 1


class RoundMessage:
    """One round's message over ``vector`` (a new zero vector when None); the parts are views of it."""

    def __init__(self, layout: MessageLayout, device=None, vector: torch.Tensor | None = None):
        if vector is None:
            vector = torch.zeros(layout.size, dtype=torch.float64, device=device)
        if vector.shape != (layout.size,):
            raise ValueError(f"A message of layout {layout} has {layout.size} entries, "
                             f"got shape {tuple(vector.shape)}.")
        self.layout, self.vector = layout, vector
        end_state, end_extras = layout.state, layout.state + layout.extras
        self.state = vector[:end_state]
        self.extras = vector[end_state:end_extras]
        self.traffic = vector[end_extras]  # 0-dim views: written in place
        self.finished = vector[end_extras + 1:end_extras + 1 + layout.trainees]
        self.weight = vector[-1]
        self.fixed: torch.Tensor | None = None  # under secure aggregation: the int64 sum (federation.fixedpoint)

    def add_fixed(self, quantised: torch.Tensor) -> None:
        """Add one contribution already quantised (:func:`~.fixedpoint.quantise`) into the int64 sum."""
        if self.fixed is None:
            self.fixed = torch.zeros(self.layout.size, dtype=torch.int64, device=quantised.device)
        self.fixed += quantised

    @classmethod
    def from_fixed(cls, layout: MessageLayout, total: torch.Tensor, round_no: int) -> "RoundMessage":
        """The message whose int64 sum is ``total`` (every trainee's quantised contribution), checked."""
        from hsl_lightning.federation.fixedpoint import check_sum, dequantise

        message = cls(layout, vector=dequantise(total))
        check_sum(message.vector, message.finished, float(message.weight), round_no)
        return message

    def add(self, trainee: int, weight: float, extra: torch.Tensor | None = None) -> None:
        """Count ``trainee`` as finished, with its ``weight`` and strategy vector (its state is added
        by the merge, which knows whether it must keep a copy: :mod:`~.merge`)."""
        self.finished[trainee] = 1
        if extra is not None:
            self.extras += extra.to(self.vector.device)
        self.weight += weight

    def all_reduce(self, fabric, round_no: int = 0) -> "RoundMessage":
        """The sum of every rank's message (this one, on a single rank); under secure aggregation the
        sum of the int64 vectors, read back as float64 (``round_no`` names the round if it is refused)."""
        if self.fixed is not None:
            return RoundMessage.from_fixed(self.layout, sync.all_reduce_sum(fabric, self.fixed), round_no)
        return RoundMessage(self.layout, vector=sync.all_reduce_sum(fabric, self.vector))
