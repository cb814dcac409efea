"""The round's message as fixed-point integers modulo 2^64: what secure aggregation sums.

Secure aggregation (:mod:`hsl_lightning.flower.secagg`) adds masks that cancel only in the sum of
every site's contribution, and masks are uniform integers modulo 2^64, so what is summed must be
integers too. With ``federation.secure_aggregation`` on, every trainee's contribution (its whole
part of the round's message: weighted shared state, strategy extras, finished flag, weight) is
rounded to a multiple of 2^-F (:data:`FRACTION_BITS` = F) and the sum is taken over int64 with
wrap-around, exactly the arithmetic of the masked sum. The simulator does the same (the sum over
its ranks is an all-reduce of the int64 vector), so a deployment with secure aggregation gives the
simulator's numbers bit for bit; and an integer sum does not depend on the order of its terms.

**Weights.** A trainee's weight w_t is divided by the run's total weight W (every trainee's, fixed
for the run), so the state part holds (w_t / W) x state and never exceeds the largest entry of any
state; the merge divides by the summed weight as before, so the mean is unchanged (a dropped site
only lowers the denominator).

**The bound.** With N trainees, each contribution's entries must lie within R = 2^(63-F) / N, so
that no partial or total sum leaves int64 (|sum| < N x R = 2^(63-F)). F = 40 gives R = 2^23 / N
(2.8 million for 3 sites: BatchNorm's running statistics and step counters included) and a
rounding error of at most 2^-41 = 4.5e-13 per entry and trainee: below float32's spacing for every
entry larger than about 4e-6 in magnitude (float32's spacing there is 2^-41), so for all but the
smallest weights it is below what the merged state is rounded to anyway. The merged state therefore differs from the
float64 mean by at most N x 2^-41 / (summed normalised weight) per entry before it is rounded to
the entries' own dtypes (``StatePacker.representable``). A contribution beyond the range, or not
finite, is refused with a message naming the trainee and the round.
"""

from __future__ import annotations

import math

import torch

from hsl_lightning.errors import HSLError

#: fractional bits of the fixed-point representation
FRACTION_BITS = 40
SCALE = float(2 ** FRACTION_BITS)


def limit(trainees: int) -> float:
    """R: the largest magnitude an entry of one contribution may have, with ``trainees`` in the sum."""
    return 2.0 ** (63 - FRACTION_BITS) / max(1, trainees)


def quantise(vector: torch.Tensor, trainees: int, who: str, round_no: int) -> torch.Tensor:
    """``vector`` (float64) as int64 multiples of 2^-F; refused (naming ``who`` and the round,
    numbered as the progress lines number it) when not finite or beyond :func:`limit`."""
    vector = vector.detach().to(torch.float64)
    bound = limit(trainees)
    if not bool(torch.isfinite(vector).all()):
        raise HSLError(f"{who}'s contribution to round {round_no} is not finite (NaN or inf): secure aggregation "
                       "cannot sum it. Lower the learning rate or check the data.")
    peak = float(vector.abs().max()) if vector.numel() else 0.0
    if peak >= bound:
        raise HSLError(f"{who}'s contribution to round {round_no} holds a value of {peak:.4g}, beyond the secure sum's "
                       f"range of +-{bound:.4g} (2^{63 - FRACTION_BITS} / {trainees} trainees). Set "
                       "federation.secure_aggregation: false to sum in floating point instead.")
    return torch.round(vector * SCALE).to(torch.int64)


def dequantise(total: torch.Tensor) -> torch.Tensor:
    """The sum's int64 (wrapped modulo 2^64, as the masked sum arrives) as float64."""
    return total.to(torch.int64).to(torch.float64) / SCALE


def error_bound(trainees: int) -> float:
    """The largest difference between the fixed-point and the exact sum of ``trainees`` contributions, per entry."""
    return trainees * 0.5 / SCALE


def check_sum(values: torch.Tensor, finished: torch.Tensor, weight: float, round_no: int) -> None:
    """The summed message must be a sum of valid contributions: finite, finished flags 0 or 1, the
    normalised weight at most 1 (what a wrong mask, a forged or an out-of-range reply would break)."""
    flags_ok = bool(((finished == 0) | (finished == 1)).all())
    if not bool(torch.isfinite(values).all()) or not flags_ok or not -1e-9 <= weight <= 1 + 1e-6 or math.isnan(weight):
        raise HSLError(f"The secure sum of round {round_no} is not a sum of valid contributions (finished flags "
                       f"{finished.tolist()}, weight {weight:.6g}): a site's reply was corrupted, masked with the "
                       "wrong keys, or out of range. The round is refused.")


def resolve(setting: bool | None, strategy, trainees: int, numel: int) -> bool:
    """Whether a run sums its messages as fixed-point integers (``federation.secure_aggregation``:
    None, on where the merge is a weighted sum of the contributions; True, on or refused; False, off)."""
    why = strategy.secure_sum_problem(trainees, numel)
    if setting is False or (setting is None and why is not None):
        return False
    if why is not None:
        raise HSLError(f"federation.secure_aggregation sums the sites' masked contributions, so the coordinator learns "
                       f"only their sum; strategy '{strategy.name}' cannot work from the sum: {why}. Set "
                       "federation.secure_aggregation to null (off for such strategies) or false.")
    return True
