"""The deployment's seam: the typed protocol and its one encoding, the transports' timeouts, the
site's stand-in for Fabric, and a hung site as the coordinator reports it (no training here)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from hsl_lightning.errors import HSLError
from hsl_lightning.flower import protocol
from hsl_lightning.flower.transport import Timeouts


def test_every_message_survives_the_encoding_that_every_transport_carries():
    merged = np.arange(5, dtype=np.float32)
    messages = [protocol.Hello(), protocol.Round(3, merged, True, False, keep=[2], extras=np.ones(2), timeout_s=9.0),
                protocol.Finish(4, merged, True, {"round": 4}), protocol.Stop(2, "site 1 (a) failed in round 3: x"),
                protocol.RoundReply(node=1, completed=3, val={"auc": 0.5}, loss=0.25, state=merged, weight=2.0,
                                    tail=np.zeros(3)),
                protocol.Failure("Site a: broken", node=0, completed=1), protocol.Stopped(True, node=2)]
    for message in messages:
        back = protocol.from_bytes(protocol.to_bytes(message))
        assert type(back) is type(message)
        for key, value in vars(message).items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(getattr(back, key), value) and getattr(back, key).dtype == value.dtype
            else:
                assert getattr(back, key) == value, key


def test_a_message_of_another_version_kind_or_shape_is_refused_with_one_message():
    header, arrays = protocol.encode(protocol.Stop(1, "why"))
    fields = json.loads(header)
    with pytest.raises(HSLError, match="different hsl_lightning versions"):
        protocol.decode(json.dumps({**fields, "version": 1}), arrays)
    with pytest.raises(HSLError, match="unknown kind 'Launch'"):
        protocol.decode(json.dumps({**fields, "kind": "Launch"}), arrays)
    with pytest.raises(HSLError, match=r"required: \['completed', 'reason'\]"):
        protocol.decode(json.dumps({"kind": "Stop", "version": protocol.VERSION, "completed": 1}), {})
    with pytest.raises(HSLError, match="Not a message"):
        protocol.encode({"action": "round"})  # the old untyped dicts are not messages


def test_the_protocol_and_the_transport_load_without_torch():
    code = ("import sys\nimport hsl_lightning.flower.protocol, hsl_lightning.flower.transport\n"
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_request_names_the_round_as_the_progress_lines_do():
    assert protocol.round_in_progress(0) == 1  # training the first round
    assert protocol.round_in_progress(1, train=True) == 2  # validated round 1, training round 2
    assert protocol.round_in_progress(4, train=False) == 4  # validating the last round


def test_the_reply_timeout_follows_the_run():
    timeouts = Timeouts(start_s=1800, factor=5, floor_s=60)
    assert timeouts.limit(None)[0] == 1800  # the first round: building the site, first training
    assert timeouts.limit(4.0)[0] == 60  # a quick round: the floor
    limit, why = timeouts.limit(40.0)
    assert limit == 200 and "5 x the slowest site's last round of 40.0 s" in why
    assert Timeouts(fixed_s=30).limit(40.0)[0] == 30


def test_the_sites_stand_in_for_fabric_refuses_collectives_it_does_not_implement():
    import torch

    from hsl_lightning.flower.site import SiteFabric

    fabric = SiteFabric(SimpleNamespace(device=torch.device("cpu"), all_reduce=lambda v: v), world=3, rank=1)
    rows = fabric.all_gather(torch.ones(2))
    assert rows.shape == (3, 2) and torch.equal(rows[1], torch.ones(2)) and rows[0].isnan().all()
    assert fabric.device.type == "cpu"  # everything else is Fabric's
    for name in ("all_reduce", "broadcast", "barrier"):
        with pytest.raises(HSLError, match=f"Fabric.{name} has no meaning"):
            getattr(fabric, name)


class Grid:
    """Flower's Grid as the coordinator uses it: nodes 11 and 12 answer every request, node 13 never does."""

    def __init__(self):
        self.pushed, self.replies = [], []

    def get_node_ids(self):
        return [11, 12, 13]

    def push_messages(self, messages):
        from hsl_lightning.flower.app import decode, encode

        ids = []
        for message in messages:
            self.pushed.append(message)
            mid = f"m{len(self.pushed)}"
            ids.append(mid)
            node = message.metadata.dst_node_id
            if node != 13:
                assert isinstance(decode(message.content), protocol.Stop)
                reply = encode(protocol.Stopped(True, node=node - 11))
                self.replies.append((mid, SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid),
                                                          has_error=lambda: False, content=reply)))
        return ids

    def pull_messages(self, ids):
        return [reply for mid, reply in self.replies if mid in ids]


def test_a_hung_site_is_reported_as_silent_after_the_runs_timeout_not_an_hour(monkeypatch):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from hsl_lightning.flower.app import FlowerSites

    for key in ("_run_id", "_node_id", "_task_id"):  # what the ServerApp's process has set
        monkeypatch.setattr(TaskIdentity, key, 1, raising=False)
    grid = Grid()
    sites = FlowerSites(grid, 3, wait_s=1, poll_s=0.01)
    sites.node_of = {0: 11, 1: 12, 2: 13}
    replies = sites.exchange({i: protocol.Stop(2, "done") for i in range(3)}, timeout_s=0.3)
    assert isinstance(replies[0], protocol.Stopped) and isinstance(replies[1], protocol.Stopped)
    assert isinstance(replies[2], protocol.Failure)
    assert replies[2].error == "stopped answering: no reply within 0 s"
    # Flower's own expiry comes after the coordinator's limit: a silent site is never an 'expired message'
    assert all(m.metadata.ttl > 0.3 for m in grid.pushed)


def test_the_coordinator_names_the_silent_site_the_round_and_the_limit():
    from hsl_lightning.flower.server import SitePhases
    from hsl_lightning.flower.transport import Sites

    class Silent(Sites):
        count = 2

        def exchange(self, requests, timeout_s):
            return {i: protocol.Failure(f"stopped answering: no reply within {timeout_s:.0f} s")
                    for i in requests}

    federation = SimpleNamespace(fuse_institutions=False, min_nodes=None, rounds=5,
                                 failed=lambda who, cause, r: (_ for _ in ()).throw(
                                     HSLError(f"{who} failed in round {r + 1}: {cause}")))
    phases = SitePhases(federation, Silent(), Timeouts(factor=4, floor_s=10))
    phases.site_info = {1: {"site": "hospital2"}}
    phases.slowest_s = 30.0
    run = SimpleNamespace(layout=SimpleNamespace(extras=0), secure=False)
    state = SimpleNamespace(merged=__import__("torch").zeros(3), best=SimpleNamespace(round=0))
    with pytest.raises(HSLError) as caught:
        phases.validate(run, state, r=1)
    message = str(caught.value)
    assert message.startswith("site 0 failed in round 3: stopped answering: no reply within 120 s (4 x the "
                              "slowest site's last round of 30.0 s")
