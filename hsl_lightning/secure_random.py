"""Randomness that must not come from a run's seed: DP noise (federation/privacy.py) and the site statistics' noise
(data/statistics.py) draw their uniforms here, from the operating system's cryptographic generator."""

from __future__ import annotations

import os

import torch

BITS53 = (1 << 53) - 1


def secure_uniform(n: int, random_bytes=os.urandom) -> torch.Tensor:
    """``n`` uniforms in [0, 1) in float64, each from 64 random bits of which the low 53 are kept (every multiple of
    2^-53 equally likely); ``random_bytes``: another source of bytes (the DP benchmark's ChaCha20)."""
    bits = torch.frombuffer(bytearray(random_bytes(8 * n)), dtype=torch.int64)
    return bits.bitwise_and_(BITS53).to(torch.float64).mul_(2.0 ** -53)
