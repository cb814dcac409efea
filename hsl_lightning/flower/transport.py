"""The transport: how a deployment's coordinator reaches its sites, and how long it waits for them.

A transport is a :class:`Sites` subclass that implements :meth:`Sites.exchange` (send each site a
:mod:`~hsl_lightning.flower.protocol` message, return its reply) and, where sites must first be
found, :meth:`Sites.connect`. Two exist: :class:`LocalSites` (sites in this process, through the
real encoding: the tests') and :class:`hsl_lightning.flower.app.FlowerSites` (Flower's SuperLink
and SuperNodes). Another engine, or a gRPC service of one's own, is one more file with one more
subclass; :class:`~hsl_lightning.flower.server.SitePhases` runs the round loop over any of them.

Torch-free: Flower's ClientApp process imports it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsl_lightning.flower import protocol
from hsl_lightning.flower.protocol import Hello


@dataclass
class Timeouts:
    """How long the coordinator waits for a site's reply before it counts the site as gone.

    The first request and the first round (a site builds its data and model, then trains for the
    first time) wait ``start_s``; every later request waits ``factor`` times the slowest site's own
    time on the last round, and at least ``floor_s``; ``fixed_s`` (when set) replaces both rules.
    Run config keys: ``start-timeout-s``, ``timeout-factor``, ``timeout-floor-s``, ``round-timeout-s``."""

    start_s: float = 1800.0
    factor: float = 5.0
    floor_s: float = 300.0
    fixed_s: float | None = None

    def limit(self, slowest_s: float | None) -> tuple[float, str]:
        """(seconds to wait, why that long) after a last round whose slowest site took ``slowest_s``."""
        if self.fixed_s:
            return self.fixed_s, "the run's round-timeout-s"
        if slowest_s is None:
            return self.start_s, "the first round's limit, start-timeout-s"
        limit = max(self.floor_s, self.factor * slowest_s)
        return limit, (f"{self.factor:g} x the slowest site's last round of {slowest_s:.1f} s, at least "
                       f"{self.floor_s:.0f} s: timeout-factor, timeout-floor-s")


class Sites:
    """The transport: how requests reach the sites, addressed by hospital index (0 .. count-1).

    A new transport (another engine, a gRPC service of one's own) is a subclass in one file that
    implements :meth:`exchange`, and :meth:`connect` where sites must first be found."""

    count: int

    def exchange(self, requests: dict[int, object], timeout_s: float) -> dict[int, object]:
        """Send each site its request (a :mod:`~hsl_lightning.flower.protocol` message); return one
        reply message per site asked, in any order: a :class:`~.protocol.Failure` for a site that
        failed or did not answer within ``timeout_s`` (saying so: ``stopped answering: ...``)."""
        raise NotImplementedError

    def connect(self, hello: Hello, timeout_s: float) -> dict[int, object]:
        """Find the sites and send each the :class:`~.protocol.Hello`; replies by hospital index."""
        return self.exchange({i: hello for i in range(self.count)}, timeout_s)


class LocalSites(Sites):
    """Sites answered in this process, in hospital order (the tests' and the benchmark's reference):
    every request and reply goes through the protocol's encoding and is pickled, as the site's
    worker's socket carries it, and the site answers it as its worker would (:func:`.site.answer`)."""

    def __init__(self, sites: list):
        self.sites, self.count = sites, len(sites)
        self.sent: list[tuple[int, object]] = []  # every request as the sites decoded it, for tests

    def exchange(self, requests, timeout_s):
        from hsl_lightning.flower.site import answer  # torch: only where sites train in this process

        out = {}
        for i, request in requests.items():
            received = protocol.from_bytes(protocol.to_bytes(request))
            self.sent.append((i, received))
            out[i] = protocol.from_bytes(protocol.to_bytes(answer(self.sites[i], received)))
        return out
