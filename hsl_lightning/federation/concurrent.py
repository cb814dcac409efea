"""Several institutions trained at once in one process: worker threads, each with its own module.

On a CPU, the small models and batches of this field keep one core busy better than two: on the
slowest machines of this project timm's ResNet-18 at 28 px trains at 112 images/s on one thread and
at 175 on two. So rather than give one institution all of a rank's threads, :class:`Workers` trains
k institutions at the same time, in k Python threads with ``threads // k`` intra-op threads each
(torch releases the GIL inside its kernels). Each worker owns a copy of the rank's module (the first
is the module itself); the threads start once per run, so nothing is spawned or imported again.

:class:`Concurrent` is the round trainer built on it: it runs
:meth:`~hsl_lightning.federation.training.OneByOne.train_trainee` for each hosted trainee in a worker
and yields the outcomes in trainee order, so the round's message adds them in the same order as one
after another. With the same threads per institution the result is identical to training them one
after another (tests/test_concurrent.py): sampling and augmentation come from generators seeded per
(seed, round, trainee), and dropout from the worker's own generator seeded the same way
(:mod:`hsl_lightning.federation.randomness`). A module that draws from torch's global generator in
any other way (timm's drop path, say) would make the result depend on thread timing: the first round
is therefore held back and checked, and if anything drew from the global generator it is trained
again one trainee after another, as is every later round, with a warning.

Validation and testing use the same workers (:meth:`Workers.map`), each node's model in a worker.

Strategies that act on an institution's training (local hooks such as FedProx's proximal term, or
per-round traffic read from the module) keep per-trainee state in the strategy object, so they train
one after another (:meth:`Strategy.concurrent`).
"""

from __future__ import annotations

import collections
import copy
import itertools
import queue
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch

from hsl_lightning.federation import randomness
from hsl_lightning.federation.state import RankState, clone_state
from hsl_lightning.federation.training import OneByOne, Outcome


class Workers:
    """``k`` threads, each training on ``threads`` intra-op threads in its own copy of ``module``."""

    def __init__(self, module: torch.nn.Module, k: int, threads: int):
        self.k, self.threads = k, threads
        self._restore_threads = torch.get_num_threads()
        self._modules: queue.SimpleQueue = queue.SimpleQueue()
        self._modules.put(module)
        for _ in range(k - 1):
            self._modules.put(copy.deepcopy(module))
        randomness.install_dropout()
        self._pool = ThreadPoolExecutor(k, thread_name_prefix="hsl-institution", initializer=self._start_thread)

    def _start_thread(self) -> None:
        torch.set_num_threads(self.threads)
        randomness.mark_worker()

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        """``fn(module, item)`` for every item, at most ``k`` at a time, each in a free worker's
        module; the results in the order of ``items``. Work runs a little ahead of the consumer (2k
        items), so finished results wait in memory for at most that many."""
        def job(item):
            module = self._modules.get()
            try:
                return fn(module, item)
            finally:
                self._modules.put(module)

        items = iter(items)
        pending = collections.deque(self._pool.submit(job, item) for item in itertools.islice(items, 2 * self.k))
        while pending:
            result = pending.popleft().result()
            pending.extend(self._pool.submit(job, item) for item in itertools.islice(items, 1))
            yield result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        randomness.remove_dropout()
        torch.set_num_threads(self._restore_threads)


class Concurrent:
    """Trains this rank's trainees in :class:`Workers`, yielding outcomes in trainee order."""

    def __init__(self, federation, run, workers: Workers):
        self.run, self.workers = run, workers
        self.one = OneByOne(federation, run)
        self.checked = False  # whether a round has shown that nothing draws from the global generator
        self.one_by_one = False  # fallen back for good

    def train_round(self, r: int, state: RankState, bar) -> Iterator[tuple[int, Outcome | Exception]]:
        if self.one_by_one:
            yield from self.one.train_round(r, state, bar)
            return
        before = randomness.global_state()

        def job(module, t):
            outcome = self.one.train_trainee(r, t, state, bar, module=module)
            if isinstance(outcome, Outcome):  # the worker's module trains the next trainee next
                outcome.state = clone_state(outcome.state)
            return t, outcome

        outcomes = self.workers.map(job, self.run.mine)
        if not self.checked:  # hold the first round back until it is known to be reproducible
            outcomes = list(outcomes)
            if not torch.equal(before, randomness.global_state()):
                self._fall_back("so this round is trained again one trainee after another, as are all later rounds")
                yield from self.one.train_round(r, state, bar)
                return
            self.checked = True
        yield from outcomes
        if not torch.equal(before, randomness.global_state()):
            self._fall_back(f"round {r + 1} may not be reproducible; later rounds train one trainee after another")

    def _fall_back(self, consequence: str) -> None:
        self.one_by_one = True
        self.run.at_once = (1, torch.get_num_threads())
        warnings.warn("The model drew random numbers from torch's global generator outside dropout while institutions "
                      f"trained at the same time, so the result would depend on thread timing; {consequence}. Set "
                      "federation.concurrent_institutions: 1 to skip the attempt.", stacklevel=2)

    def close(self) -> None:
        """The workers belong to the run, which closes them."""
