"""``hsl flower supernode --check-only`` asks a real SuperLink (127.0.0.1, TLS and node authentication
on) whether it has registered the site's node key: a registered key passes, an unregistered one is
refused with the site's name and how to register it, and the check leaves the node "registered",
never "online" (the ServerApp only sees online nodes)."""

import json
import sys
from pathlib import Path

import pytest

from hsl_lightning.errors import HSLError
from hsl_lightning.flower import commands
from hsl_lightning.flower.commands import key_fingerprint
from hsl_lightning.flower.localhost import Localhost, _bin

HSL = str(Path(sys.executable).parent / "hsl")


def _check(lh: Localhost, site: str, index: int):
    return lh.run(HSL, "flower", "supernode", "--superlink", lh.address, "--root-certificates",
                  str(lh.keys / "ca.crt"), "--auth-supernode-private-key", str(lh.keys / site),
                  "--node-config", f'node-index={index} name="{site}"', "--check-only", check=False)


def test_the_superlinks_answers_are_read_as_flower_1_42_gives_them(tmp_path, monkeypatch, capsys):
    """The fast check, without a SuperLink: the (ApiError code, HTTP status) of the probe and of a random
    key's control probe decide registered, unregistered, refused signature or cannot tell."""
    from hsl_lightning.flower.keys import make_keys

    make_keys(tmp_path, ["hospital1"], ["localhost"])
    answers = []  # what the SuperLink answers each probe in turn: the site's key, then a random key's
    monkeypatch.setattr(commands, "_activate_probe", lambda address, ca, private_key, timeout: answers.pop(0))

    def check(*replies):
        answers[:] = replies
        return commands.check_registered("link:8443", tmp_path / "ca.crt", tmp_path / "hospital1", "hospital1")

    assert check((2003, 400), (2004, 412)) is True and answers == []  # the key found, the interval refused
    with pytest.raises(HSLError, match=r"Site hospital1: .* has not registered .*flwr supernode register"):
        check((2004, 412))
    with pytest.raises(HSLError, match="refused the node key's signature"):
        check((None, 401))
    assert check((2003, 400), (2003, 400)) is False  # a random key is "found" too: the answer says nothing
    assert "cannot tell whether the SuperLink has registered" in capsys.readouterr().out


@pytest.mark.slow
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
