"""Where a trainee's random numbers come from, whichever thread trains it.

One after another, a trainee's local training seeds torch's global generator from (seed, round,
trainee), and everything it draws follows from that seed: sampling and augmentation come from their
own seeded generators; dropout, and the base seed torch's DataLoader draws each time it is iterated,
from the global one. When several trainees train at once in threads
(:mod:`hsl_lightning.federation.concurrent`), the global generator is shared, so the order of their
draws would depend on thread timing. Instead, a worker thread holds its own generator, seeded with
the same value; its loaders draw from it (:func:`adopt`), and so does its dropout: while workers
exist, ``torch.nn.functional.dropout`` is replaced by :func:`_dropout`, which repeats torch's CPU
dropout (a Bernoulli mask, divided by the keep probability, multiplied in) with that generator. The
draws are therefore the very ones the one-after-another path makes (tests/test_concurrent.py checks
outputs and gradients bit for bit). Outside worker threads, and for anything but training-mode CPU
dropout, the original function runs.

Anything else that draws from the global generator inside a worker (timm's drop path, a module's own
``torch.rand``) is not covered: :func:`global_state` lets the caller notice and fall back.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

_local = threading.local()
_lock = threading.Lock()
_installed = 0
_original = F.dropout


def seed_trainee(seed: int) -> None:
    """Seed what trainee training draws: the calling worker's generator, else torch's global one."""
    if getattr(_local, "worker", False):
        _local.generator = torch.Generator().manual_seed(seed)
    else:
        torch.manual_seed(seed)


def mark_worker() -> None:
    """Declare the calling thread a worker: its dropout draws from its own generator."""
    _local.worker = True
    _local.generator = torch.Generator().manual_seed(0)


def adopt(loader):
    """Let ``loader`` draw its per-iteration base seed (torch's DataLoader draws one each time it is
    iterated) from the calling worker's generator, where the one-after-another path draws it from the
    global one; outside workers, ``loader`` is left as it is."""
    generator = getattr(_local, "generator", None)
    if generator is not None and loader.generator is None:
        loader.generator = generator
    return loader


def global_state() -> torch.Tensor:
    """The global CPU generator's state: compare two to see whether anything drew from it."""
    return torch.default_generator.get_state()


def _dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    generator = getattr(_local, "generator", None)
    if (generator is None or not training or not 0.0 < p < 1.0 or type(input) is not torch.Tensor
            or input.device.type != "cpu"):
        return _original(input, p, training, inplace)
    noise = torch.empty_like(input).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    return input.mul_(noise) if inplace else input * noise


def install_dropout() -> None:
    """Route dropout through :func:`_dropout` (counted: every install needs its :func:`remove_dropout`)."""
    global _installed
    with _lock:
        _installed += 1
        F.dropout = _dropout


def remove_dropout() -> None:
    """Undo one ``install_dropout``: the original dropout is back once every installer removed its own."""
    global _installed
    with _lock:
        _installed = max(0, _installed - 1)
        if not _installed:
            F.dropout = _original
