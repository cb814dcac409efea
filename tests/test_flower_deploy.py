"""The deployment guide's commands, run as written, in ONE deployment that the checks below read: a
SuperLink behind the proxy and 3 SuperNodes (certificates made here, TLS and node authentication on),
the coordinator and each hospital in a Linux network namespace of its own where this machine can
make them (tests/netns.py: root), else all on this machine's loopback.

In it, at once (the SuperLink runs them side by side; each site answers their requests one at a
time): 2 rounds of the quickstart with secure aggregation and site statistics on, approved at every
site; and a run whose images no site can read, approved by two of the three sites. Beside them: a
SuperNode with a key the SuperLink never registered, and a site's ``--check-only`` with a wrong CA
certificate and with a missing key. ``hsl fit`` runs the same config meanwhile, for the bit-for-bit
comparison. Every process is killed and every namespace removed before the checks (the removal is
checked too)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import netns
import pytest
import torch
import yaml

from hsl_lightning.flower.localhost import Localhost, _bin

REPO = Path(__file__).resolve().parents[1]
HSL = _bin("hsl")
SITES = netns.SITES
APPROVED_BROKEN = ["hospital1", "hospital2"]  # the run that cannot read its images: hospital3 never approved it



def settle(condition, limit_s: float) -> bool:
    """Wait (at most ``limit_s``) for ``condition()``; whether it came."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def stopped_for_missing_images(log: str) -> bool:
    """The SuperNode's output has the coordinator's reason for stopping the broken run, in one line."""
    return any("the coordinator stopped the run: site " in line and "no-such-images" in line
               for line in log.splitlines())


def _before_the_runs(d, net: netns.Network, lh: Localhost) -> None:
    """Namespaces: what a site can reach, and what the coordinator exposes, before any run."""
    ca, proxy_at = lh.keys / "ca.crt", f"{netns.HOST}:{netns.PROXY_PORT}"
    superlink = lh.processes[0]
    d.superlink_namespace = net.namespace_of(superlink.pid)
    d.superlink_port = lh.port
    d.listening = netns.listeners(superlink.pid)
    d.coordinator_probe = netns.probe(net, net.coordinator, ca, http={
        "control": [f"127.0.0.1:{lh.port}", "/v1/control/list-runs"]}, connect={"lan": [netns.COORDINATOR_IP, lh.port]})
    # from each site (before its SuperNode listens on anything): the name, the proxy's TLS and its answers to
    # the Control and Runtime APIs, the SuperLink's own port by name and by address, the site's own 127.0.0.1
    d.site_probes = {site: netns.probe(
        net, net.sites[site], ca, resolve={"name": netns.HOST},
        connect={"superlink_by_name": [netns.HOST, lh.port], "superlink_by_address": [netns.COORDINATOR_IP, lh.port],
                 "own_loopback": ["127.0.0.1", lh.port]},
        tls={"proxy": proxy_at},
        http={"control": [proxy_at, "/v1/control/list-runs"], "register": [proxy_at, "/v1/control/register-node"],
              "runtime": [proxy_at, "/v1/runtime/acquire-task"]}) for site in SITES}
    # a site's own flwr CLI, pointed at the proxy as at a SuperLink
    home = d.tmp / "site-flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "site"\n\n[superlink.site]\naddress = '
                                      f'"{proxy_at}"\nroot-certificates = "{ca}"\n')
    listed = subprocess.run([*net.exec(net.sites["hospital1"]), _bin("flwr"), "ls", "site"],
                            env={**lh.env, "FLWR_HOME": str(home), "COLUMNS": "200"}, capture_output=True, text=True,
                            timeout=120)
    d.site_flwr_ls = listed.stdout + listed.stderr


def deploy(tmp: Path) -> SimpleNamespace:
    """Make the deployment, run what the module's doc says, take it all down; what the checks read."""
    d = SimpleNamespace(tmp=tmp, work=tmp / "d", run_dir=tmp / "run", sim_dir=tmp / "sim",
                        broken_dir=tmp / "broken-run")
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["federation"].update(rounds=2, local_epochs=1, wandb="disabled", progress=False, statistics={"min_count": 5})
    run_yaml = tmp / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config))
    broken = json.loads(json.dumps(config))
    broken["data"]["primary"] = {"class_path": "hsl_lightning.ImageFolders",
                                 "init_args": {"root": str(tmp / "no-such-images")}}
    broken_yaml = tmp / "broken.yaml"
    broken_yaml.write_text(yaml.safe_dump(broken))

    # the simulator's run of the same config (the real hsl fit), while the deployment sets up and runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    sim_log = open(tmp / "sim.log", "w")  # noqa: SIM115 - closed below
    sim = subprocess.Popen([HSL, "fit", "--config", str(run_yaml), "--federation.run_dir", str(d.sim_dir),
                            "--federation.statistics.salt_file", str(tmp / "sim-salt")], env=env, stdout=sim_log,
                           stderr=subprocess.STDOUT)
    try:
        _deploy_beside(d, run_yaml, broken_yaml)
    except BaseException:
        sim.kill()  # nothing outlives a failed deployment
        raise
    finally:
        try:
            sim.wait(600)
        finally:
            sim.kill()  # (a no-op once it has ended)
            sim_log.close()
    d.sim_rc, d.sim_log = sim.returncode, (tmp / "sim.log").read_text()
    return d


def _deploy_beside(d: SimpleNamespace, run_yaml: Path, broken_yaml: Path) -> None:
    """The deployment itself (:func:`deploy`), while the simulation runs; fills ``d``."""
    with contextlib.ExitStack() as stack:
        try:
            net = stack.enter_context(netns.namespaces())
            d.why_not_namespaces = None
        except netns.CannotMake as exc:
            net, d.why_not_namespaces = None, str(exc)
        d.net = net
        if net is not None:
            d.root_untouched = net.root_state() == net.root_before
            wrap = {**net.wrap, "extra3": net.exec(net.sites["hospital1"])}  # the intruder dials from a site's LAN
            lh = Localhost(d.work, sites=len(SITES), proxy=True, wrap=wrap,
                           proxy_listen=f"{netns.COORDINATOR_IP}:{netns.PROXY_PORT}",
                           site_address=f"{netns.HOST}:{netns.PROXY_PORT}")
            lh.env["FLWR_TELEMETRY_ENABLED"] = "0"  # (nothing could leave the namespaces anyway)
        else:
            lh = Localhost(d.work)  # through the proxy where nginx is installed
        stack.enter_context(lh)
        d.lh = lh
        lh.make_keys(["--hosts", netns.HOST])  # as the guide: the certificate names the host the sites dial
        # a key pair the SuperLink never registered, for a SuperNode named as its key ("extra3"), so that only
        # the registration stops it (our pre-flight asks the SuperLink before Flower would refuse it)
        lh.run(HSL, "flower", "keys", "--out", str(lh.keys / "other"), "--sites", "extra3")
        lh.start_superlink()
        if net is not None:
            _before_the_runs(d, net, lh)
        for site in lh.sites:
            lh.register(site)  # flwr CLI, on the coordinator, at its 127.0.0.1
        supernodes = [lh.start_supernode(i) for i in range(len(SITES))]
        intruder = lh.start_supernode(3, key="other/extra3")  # a key the SuperLink never registered
        if net is not None:  # (a moment after Popen: `ip netns exec` enters the namespace, then execs)
            for site, p in zip(lh.sites, supernodes):
                settle(lambda p=p, site=site: net.namespace_of(p.pid) == net.sites[site], 30)
            d.supernode_namespaces = {site: net.namespace_of(p.pid) for site, p in zip(lh.sites, supernodes)}

        apps = {"run": lh.prepare(run_yaml, d.run_dir),
                "broken": lh.prepare(broken_yaml, d.broken_dir, "broken-app", approve=False)}
        lh.approve(apps["broken"], APPROVED_BROKEN)  # not hospital3
        watcher = netns.Watcher(net, lh.workdir / "sites", lh.processes[0].pid) if net is not None else None
        if watcher:
            watcher.start()
        try:
            with ThreadPoolExecutor(len(apps)) as pool:
                launched = {name: pool.submit(lh.launch, app, 900) for name, app in apps.items()}
                d.done = {name: future.result() for name, future in launched.items()}
        finally:
            if watcher:
                watcher.done.set()
                watcher.join(10)
        d.watcher = watcher
        d.refused = lh.refusals(apps["broken"], d.broken_dir, d.done["broken"], sites=["hospital3"])
        try:
            d.intruder_rc = intruder.wait(60)
        except subprocess.TimeoutExpired:
            d.intruder_rc = None
        d.stop_seen = settle(lambda: all(stopped_for_missing_images(lh.log(f"supernode-{s}")) for s in lh.sites), 60)
        d.approvals = {site: lh.approvals(site).read_text() for site in lh.sites}
        d.site_runs = {site: {f.name: (f / "run.yaml").read_text() if (f / "run.yaml").is_file() else ""
                              for f in (lh.workdir / "sites" / site).glob("run-*")} for site in lh.sites}
        broken_folders = [lh.workdir / "sites" / site / name for site, runs in d.site_runs.items()
                          for name, text in runs.items() if "no-such-images" in text]
        d.broken_workers_gone = bool(broken_folders) and settle(
            lambda: not any((f / "worker.pid").exists() for f in broken_folders), 60)
        d.workers_left = [] if settle(lambda: not list(lh.workdir.glob("sites/*/*/worker.pid")), 60) else sorted(
            str(f) for f in lh.workdir.glob("sites/*/*/worker.pid"))  # the good run's too, once it finished

        # a SuperNode given the wrong CA certificate, or a missing key (checked from a site's own network)
        d.wrong_ca = lh.run(HSL, "flower", "supernode", "--superlink", lh.address, "--root-certificates",
                            str(lh.keys / "other" / "ca.crt"), "--auth-supernode-private-key",
                            str(lh.keys / "hospital1"), "--node-config", 'node-index=0 name="hospital1"',
                            "--check-only", check=False, role="hospital1")
        d.missing_key = lh.run(HSL, "flower", "supernode", "--superlink", lh.address, "--root-certificates",
                               str(lh.keys / "ca.crt"), "--auth-supernode-private-key", str(lh.keys / "nobody"),
                               "--node-config", 'node-index=2 name="hospital3"', "--check-only", check=False,
                               role="hospital3")
        d.logs = {name: lh.log(name) for name in ["superlink", *[f"supernode-{s}" for s in lh.sites], "supernode-extra3"]}
        access = lh.workdir / "proxy" / "logs" / "access.log"
        d.access_log = access.read_text() if access.is_file() else None


def report(d, run: str = "run") -> str:
    done = d.done[run]
    return (f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}\n" +
            "\n".join(f"--- {name}:\n{text[-2000:]}" for name, text in d.logs.items()))


def the_guides_run_and_its_refusals(d):
    """The guide's run; the unregistered key, the wrong CA and the missing key refused."""
    assert (d.run_dir / "summary.json").is_file(), report(d)
    assert "hsl: deployed run written to" in d.done["run"].stdout + d.done["run"].stderr, report(d)
    summary = json.loads((d.run_dir / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and summary["deployment"]["failed"] == {}
    assert summary["deployment"]["secure_aggregation"] is True  # the default for the quickstart's hsl strategy
    assert [n["name"] for n in summary["nodes"]] == ["node0", "node1", "node2"]
    assert summary["deployment"]["site_names"] == {"0": "hospital1", "1": "hospital2", "2": "hospital3"}
    assert (d.run_dir / "model.ckpt").is_file() and (d.run_dir / "config.yaml").is_file()
    # the key the SuperLink never registered: refused, saying so in one line, while the runs went on without it
    intruder = d.logs["supernode-extra3"]
    assert d.intruder_rc == 2 and "Site extra3" in intruder and "has not registered this site's node key" in intruder, \
        (d.intruder_rc, intruder[-2000:])
    assert "Traceback" not in intruder
    assert all(0 <= n["test_auc"] <= 1 and 0 <= n["val_auc"] <= 1 for n in summary["nodes"])
    # the wrong CA certificate, a missing key: one line naming the site, no traceback
    assert d.wrong_ca.returncode == 2 and "Site hospital1: the SuperLink at" in d.wrong_ca.stderr, d.wrong_ca.stderr
    assert "does not vouch" in d.wrong_ca.stderr and "Traceback" not in d.wrong_ca.stderr
    assert d.missing_key.returncode == 2 and "Site hospital3: the node key" in d.missing_key.stderr
    # the server's run directory is hsl fit's: hsl test works on it unchanged
    from hsl_lightning.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        main(["test", "--run", str(d.run_dir), "--bootstraps", "20", "--out", str(d.tmp / "scored.json")])
    scored = json.loads((d.tmp / "scored.json").read_text())["sites"]
    assert [s["auc"] for s in scored] == pytest.approx([n["test_auc"] for n in summary["nodes"]], abs=1e-9)


def equal_to_hsl_fit_bit_for_bit(d):
    """The deployment equals hsl fit of the same config: weights, AUCs, site statistics."""
    assert d.sim_rc == 0 and (d.sim_dir / "summary.json").is_file(), d.sim_log[-3000:]
    assert (d.run_dir / "summary.json").is_file(), report(d)
    from hsl_lightning.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        try:
            main(["compare", str(d.sim_dir), str(d.run_dir)])
            code = 0
        except SystemExit as exc:
            code = exc.code
    assert code in (0, None) and "identical" in printed.getvalue(), printed.getvalue()[-3000:]
    simulated, summary = (json.loads((p / "summary.json").read_text()) for p in (d.sim_dir, d.run_dir))
    for a, b in zip(simulated["nodes"], summary["nodes"], strict=True):
        assert (a["name"], a["val_auc"], a["test_auc"]) == (b["name"], b["val_auc"], b["test_auc"]), (a, b)
    assert simulated["best_round"] == summary["best_round"]
    sim_w, dep_w = (torch.load(p / "model.ckpt", map_location="cpu", weights_only=False)["state_dict"]
                    for p in (d.sim_dir, d.run_dir))
    assert sim_w.keys() == dep_w.keys()
    unequal = [k for k in sim_w if not torch.equal(sim_w[k], dep_w[k])]
    assert not unequal, f"{len(unequal)} of {len(sim_w)} tensors differ, e.g. {unequal[:5]}"
    # site statistics over real Flower: the simulator's rows, but each site's fingerprint keyed by its own salt
    deployed_stats, simulated_stats = (json.loads((p / "statistics.json").read_text()) for p in (d.run_dir, d.sim_dir))
    unkeyed = lambda rows: [{k: v for k, v in row.items() if k != "fingerprint"} for row in rows]  # noqa: E731
    assert unkeyed(deployed_stats["sites"]) == unkeyed(simulated_stats["sites"])
    assert deployed_stats["comparison"] == simulated_stats["comparison"]
    assert all((d.work / "sites" / site / "fingerprint.salt").is_file() for site in SITES)
    fingerprints = {row["fingerprint"] for row in deployed_stats["sites"]} | {
        row["fingerprint"] for row in simulated_stats["sites"]}
    assert len(fingerprints) == 2 * len(SITES)  # no salt shared between sites, or with the simulator


def a_failed_run_stops_every_site_saying_why(d):
    """A run whose images no site can read stops; every site says why; no worker is left."""
    assert not (d.broken_dir / "summary.json").exists()
    # every site's operator sees why in the SuperNode's own output (the coordinator's words), the site
    # that refused the run too
    assert d.stop_seen, {s: d.logs[f"supernode-{s}"][-3000:] for s in SITES}
    broken = {site: [name for name, text in runs.items() if "no-such-images" in text]
              for site, runs in d.site_runs.items()}
    assert all(len(broken[site]) == 1 for site in APPROVED_BROKEN), broken
    assert d.broken_workers_gone  # the workers it started are gone
    assert not d.workers_left, d.workers_left  # and, once it finished, the good run's
    assert (d.run_dir / "summary.json").is_file(), report(d)  # the run beside it went on to the end


def a_site_runs_only_what_it_approved(d):
    """hospital3 never approved the broken run: it refused it, naming its digest, before starting a
    worker, while the two sites that approved it started theirs."""
    assert d.refused["refused"] and d.refused["sites"] == ["hospital3"], (d.refused["sites"], d.refused["output"])
    digest = d.refused["digest"]  # the digest hospital3's refusal named: what the other two approved
    assert all((digest in d.approvals[site]) == (site in APPROVED_BROKEN) for site in SITES), d.approvals
    for site, runs in d.site_runs.items():  # a folder per run the site took on: hospital3 has only the good run's
        assert len(runs) == (2 if site in APPROVED_BROKEN else 1), (site, list(runs))


def in_their_own_network_namespaces(d):
    """The guide's split across hosts: a site resolves the coordinator's name and reaches the proxy
    (TLS with the consortium's CA; the Control and Runtime APIs answer 403, a site's ``flwr ls`` too)
    but not the SuperLink's own port, which listens on the coordinator's 127.0.0.1 where its Control
    API answers; the coordinator exposes nothing but the proxy on its LAN address, before and during
    the runs; each site's SuperNode, ClientApps and worker ran in its own namespace and the ServerApps
    in the coordinator's; every site's Fleet API calls went through the proxy from its own address."""
    if d.net is None:
        pytest.skip(f"The deployment ran on this machine's loopback: cannot make network namespaces: "
                    f"{d.why_not_namespaces} {netns.HOW}")
    net, host, port = d.net, netns.COORDINATOR_IP, netns.PROXY_PORT
    assert d.root_untouched  # the root namespace has no part in the network
    assert d.superlink_namespace == net.coordinator
    assert netns.exposed(d.listening) == {f"{host}:{port}"}, d.listening
    assert f"127.0.0.1:{d.superlink_port}" in d.listening, d.listening
    assert d.coordinator_probe == {"control": 200, "lan": "refused"}, d.coordinator_probe
    for site, seen in d.site_probes.items():
        assert seen == {"name": host, "superlink_by_name": "refused", "superlink_by_address": "refused",
                        "own_loopback": "refused", "proxy": "ok", "control": 403, "register": 403,
                        "runtime": 403}, (site, seen)
    assert "403 Forbidden" in d.site_flwr_ls, d.site_flwr_ls
    assert d.supernode_namespaces == net.sites, d.supernode_namespaces
    seen = d.watcher.seen
    assert (net.coordinator, "serverapp") in seen, seen
    for site, ns in net.sites.items():
        assert {(ns, "supernode"), (ns, "clientapp"), (ns, "worker")} <= seen, (site, seen)
        assert d.watcher.workers.get(site) == {ns}, (site, d.watcher.workers)
    kinds = {}
    for ns, kind in seen:
        kinds.setdefault(kind, set()).add(ns)
    assert kinds.get("serverapp") == {net.coordinator}, kinds
    assert kinds.get("worker") == set(net.sites.values()), kinds
    assert d.watcher.exposed == {f"{host}:{port}"}, d.watcher.exposed
    for site, ns in net.sites.items():
        address = net.addresses[ns]
        assert re.search(rf'^{re.escape(address)} \[[^]]*\] "POST /v1/fleet/[A-Za-z0-9-]+" 200 ', d.access_log, re.M), \
            (site, d.access_log[-2000:])
    assert "/v1/control/list-runs\" 403" in d.access_log  # the sites' probes, refused


CHECKS = [the_guides_run_and_its_refusals, equal_to_hsl_fit_bit_for_bit, a_failed_run_stops_every_site_saying_why,
          a_site_runs_only_what_it_approved, in_their_own_network_namespaces]


@pytest.mark.slow
def test_the_deployment_guide_end_to_end(tmp_path, subtests):
    """One deployment (the module's doc): each check is a subtest of its own, reported apart. (One test,
    not one per check reading a module fixture: xdist may hand a module's tests to two workers, which
    would make the deployment twice.)"""
    d = deploy(tmp_path)
    for check in CHECKS:
        with subtests.test(msg=check.__name__):
            check(d)


def test_the_harness_gives_the_flwr_cli_the_superlink_and_the_sites_only_the_proxy(tmp_path):
    """The guide's split, as the deployment above runs it: the coordinator's flwr CLI talks to the
    SuperLink on 127.0.0.1; the sites dial the proxy's address, never the SuperLink's port."""
    lh = Localhost(tmp_path, proxy=False)
    assert lh.address == lh.superlink_address and lh.superlink_address.startswith("127.0.0.1:")
    lh.make_keys()
    assert f'address = "{lh.superlink_address}"' in (tmp_path / "flwr" / "config.toml").read_text()
    assert {p.name for p in lh.keys.glob("*.pub")} == {f"{s}.pub" for s in lh.sites}  # the consortium's keys
    from hsl_lightning.flower.proxy import nginx_binary

    if nginx_binary() is not None:
        proxied = Localhost(tmp_path / "p", proxy=True)
        assert proxied.address != proxied.superlink_address and proxied.address.endswith(f":{proxied.proxy_port}")


def test_the_listener_reader_sees_a_socket_and_tells_loopback_from_exposed():
    """What the namespace test uses to show the SuperLink listens on loopback only: checked on a
    socket of this process (no namespace needed)."""
    import ipaddress
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert f"127.0.0.1:{port}" in netns.listeners(os.getpid())
    assert netns.exposed({"127.0.0.1:80", "[::1]:80", "[::ffff:127.0.0.1]:80", f"{netns.COORDINATOR_IP}:8443"}) == {
        f"{netns.COORDINATOR_IP}:8443"}
    assert all(ipaddress.ip_address(f"{netns.SUBNET}.{i}").is_private for i in (1, 11, 12, 13))
