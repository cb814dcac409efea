"""The deployment guide's commands, run as written: a SuperLink and 3 SuperNodes on this machine
(self-signed certificates made here, TLS and node authentication on), 2 rounds of the quickstart,
then the checks a site's IT staff would meet: an unregistered key, a wrong CA certificate, a missing
key. Every process group is killed at the end (tests/.. Localhost.stop)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hsl_lightning.flower.localhost import Localhost

REPO = Path(__file__).resolve().parents[1]
HSL = str(Path(sys.executable).parent / "hsl")


def wait_until(condition, message: str, limit_s: float = 60.0) -> None:
    """Wait (at most ``limit_s``) for ``condition()``; fail with ``message``."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


@pytest.mark.slow
def test_the_deployment_guide_end_to_end(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["federation"].update(rounds=2, local_epochs=1, wandb="disabled", progress=False,
                                statistics={"min_count": 5})
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    with Localhost(tmp_path / "d") as lh:
        lh.make_keys(["--hosts", "superlink.example.org"])  # as the guide: the sites' name for the SuperLink
        lh.run(HSL, "flower", "keys", "--out", str(lh.keys / "other"), "--sites", "intruder")
        lh.start_superlink()
        for site in lh.sites:
            lh.register(site)
        for i in range(3):
            lh.start_supernode(i)
        intruder = lh.start_supernode(3, key="other/intruder")  # a key the SuperLink never registered
        done = lh.submit(run_yaml, run_dir, timeout=600)
        assert (run_dir / "summary.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
        assert intruder.wait(60) != 0  # refused (Flower exits it with 305) while the run went on without it

        # a SuperNode given the wrong CA certificate, or a missing key: one line naming the site
        wrong = lh.run(HSL, "flower", "supernode", "--superlink", lh.address, "--root-certificates",
                       str(lh.keys / "other" / "ca.crt"), "--auth-supernode-private-key", str(lh.keys / "hospital1"),
                       "--node-config", 'node-index=0 name="hospital1"', "--check-only", check=False)
        assert wrong.returncode == 2 and "Site hospital1: the SuperLink at" in wrong.stderr
        assert "does not vouch" in wrong.stderr and "Traceback" not in wrong.stderr
        missing = lh.run(HSL, "flower", "supernode", "--superlink", lh.address, "--root-certificates",
                         str(lh.keys / "ca.crt"), "--auth-supernode-private-key", str(lh.keys / "nobody"),
                         "--node-config", 'node-index=2 name="hospital3"', "--check-only", check=False)
        assert missing.returncode == 2 and "Site hospital3: the node key" in missing.stderr

        # a run whose images no site can read: the coordinator stops it, and every site's operator sees
        # why in the SuperNode's own output (the coordinator's words), and no worker is left running
        broken = json.loads(json.dumps(config))
        broken["data"]["primary"] = {"class_path": "hsl_lightning.ImageFolders",
                                     "init_args": {"root": str(tmp_path / "no-such-images")}}
        broken_yaml = tmp_path / "broken.yaml"
        broken_yaml.write_text(yaml.safe_dump(broken))
        failed = lh.submit(broken_yaml, tmp_path / "broken-run", timeout=300)
        assert not (tmp_path / "broken-run" / "summary.json").exists()
        for site in lh.sites:
            wait_until(lambda: "the coordinator stopped the run: site " in lh.log(f"supernode-{site}"),
                       f"{site}'s SuperNode never showed why the run stopped:\n{lh.log(f'supernode-{site}')[-3000:]}"
                       f"\n{failed.stdout[-2000:]}")
            assert "no-such-images" in lh.log(f"supernode-{site}")
        wait_until(lambda: not list((tmp_path / "d" / "sites").glob("*/*/worker.pid")),
                   "a site's worker outlived the stopped run")

        # a run no site approved (the same YAML into another run directory: another digest): every
        # site refuses it, naming the digest, before starting a worker; the run writes nothing
        workers = set((tmp_path / "d" / "sites").glob("*/*"))
        unapproved = lh.submit_unapproved(run_yaml, tmp_path / "unapproved-run", timeout=300)
        assert unapproved["refused"], (unapproved["sites"], unapproved["output"],
                                       [lh.log(f"supernode-{s}")[-1500:] for s in lh.sites])
        assert not (tmp_path / "unapproved-run").exists()
        assert set((tmp_path / "d" / "sites").glob("*/*")) == workers  # no new run folder at any site
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and summary["deployment"]["failed"] == {}
    assert [n["name"] for n in summary["nodes"]] == ["node0", "node1", "node2"]
    assert summary["deployment"]["site_names"] == {"0": "hospital1", "1": "hospital2", "2": "hospital3"}
    assert all(0 <= n["test_auc"] <= 1 for n in summary["nodes"])
    assert (run_dir / "model.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    # site statistics over real Flower: the simulator's rows, but each site's fingerprint keyed by its own salt
    from hsl_lightning.config import HSLCLI

    deployed = json.loads((run_dir / "statistics.json").read_text())
    cli = HSLCLI(args=["--config", str(run_yaml), "--federation.run_dir", str(tmp_path / "sim"),
                       "--federation.rounds", "1", "--federation.statistics.salt_file", str(tmp_path / "salt")],
                 run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    simulated = json.loads((tmp_path / "sim" / "statistics.json").read_text())
    unkeyed = lambda rows: [{k: v for k, v in row.items() if k != "fingerprint"} for row in rows]  # noqa: E731
    assert unkeyed(deployed["sites"]) == unkeyed(simulated["sites"])
    assert deployed["comparison"] == simulated["comparison"]
    assert all((tmp_path / "d" / "sites" / site / "fingerprint.salt").is_file() for site in lh.sites)
    # the server's run directory is hsl fit's: hsl test works on it unchanged
    scored = subprocess.run([HSL, "test", "--run", str(run_dir), "--bootstraps", "20"], capture_output=True, text=True,
                            timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]


def test_the_harness_gives_the_flwr_cli_the_superlink_and_the_sites_only_the_proxy(tmp_path):
    """The guide's split, as the end-to-end test runs it: the coordinator's flwr CLI talks to the
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
