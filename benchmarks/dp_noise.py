"""How long does DP-FedAvg's noise take? :func:`~hsl_lightning.federation.privacy.secure_normal`
(os.urandom, Box-Muller) against the seeded ``torch.randn`` it replaced and, where the
``cryptography`` package is installed, the same Box-Muller fed by ChaCha20 keyed from os.urandom.

    .venv/bin/python benchmarks/dp_noise.py            # a few seconds; --threads 2 for two threads

Sizes: the quickstart's shared state (1.7 M values) and a ResNet-18's (11.7 M). Median of
``--repeats`` draws each. Prints a table and one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from hsl_lightning.federation import privacy


def chacha20_normal(n: int) -> torch.Tensor:
    """secure_normal's Box-Muller with its random bytes from ChaCha20 (a fresh 256-bit key and nonce)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    stream = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()
    return privacy.secure_normal(n, lambda size: stream.update(bytes(size)))


def seeded_normal(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def median_s(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - clock)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sources = {"os.urandom": privacy.secure_normal, "seeded torch.randn": seeded_normal}
    try:
        import cryptography  # noqa: F401 - only to know whether ChaCha20 can be timed

        sources["chacha20"] = chacha20_normal
    except ImportError:
        pass
    rows = {}
    for n in (1_700_000, 11_700_000):
        for name, fn in sources.items():
            rows[f"{name} {n}"] = seconds = median_s(fn, n, args.repeats)
            print(f"{n:>11,} values  {name:<20} {seconds * 1e3:8.1f} ms")
    print("RESULT " + json.dumps({"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                                  "median_s": rows}))


if __name__ == "__main__":
    main()
