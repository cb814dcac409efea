"""``hsl flower supernode --check-only`` asks a real SuperLink (127.0.0.1, TLS and node authentication
on) whether it has registered the site's node key: a registered key passes, an unregistered one is
refused with the site's name and how to register it, and the check leaves the node "registered",
never "online" (the ServerApp only sees online nodes)."""

import json
import sys
from pathlib import Path

from hsl_lightning.flower.commands import key_fingerprint
from hsl_lightning.flower.localhost import Localhost, _bin

HSL = str(Path(sys.executable).parent / "hsl")


def _check(lh: Localhost, site: str, index: int):
    return lh.run(HSL, "flower", "supernode", "--superlink", lh.address, "--root-certificates",
                  str(lh.keys / "ca.crt"), "--auth-supernode-private-key", str(lh.keys / site),
                  "--node-config", f'node-index={index} name="{site}"', "--check-only", check=False)


def test_check_only_tells_registered_from_unregistered_keys_without_activating(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    with Localhost(tmp_path / "d", sites=2) as lh:
        lh.make_keys()
        lh.start_superlink()
        lh.register("hospital1")

        registered = _check(lh, "hospital1", 0)
        assert registered.returncode == 0, registered.stderr[-2000:]
        assert "the SuperLink has registered the node key" in registered.stdout

        unregistered = _check(lh, "hospital2", 1)
        assert unregistered.returncode == 2, unregistered.stdout + unregistered.stderr
        assert "fine" not in unregistered.stdout + unregistered.stderr
        assert "Traceback" not in unregistered.stderr
        message = unregistered.stderr
        assert "Site hospital2:" in message and "has not registered" in message
        assert f"flwr supernode register {lh.keys / 'hospital2.pub'}" in message and "--name hospital2" in message
        pub = load_ssh_public_key((lh.keys / "hospital2.pub").read_bytes())
        assert key_fingerprint(pub) in message

        # the probe activated nothing: the registered node is still "registered", not "online"
        listed = json.loads(lh.run(_bin("flwr"), "supernode", "list", "local", "--format", "json").stdout)
        assert [node["status"] for node in listed["nodes"]] == ["registered"]
        assert listed["nodes"][0]["online-at"] == "N/A"
