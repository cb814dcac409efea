"""A site runs only what it approved: the run's digest, the site's approvals file, the ClientApp's
refusal before any worker starts, and the class allow-list (hsl_lightning/flower/approval.py). No training:
the ClientApp's path runs with a fake Context, as Flower would give it, in a fresh process (which
must not import torch), with the worker call replaced by a recorder."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from hsl_lightning.errors import HSLError
from hsl_lightning.flower import approval
from hsl_lightning.flower.app import write_app

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = (REPO / "configs" / "quickstart.yaml").read_text()


def received(app: Path) -> dict:
    """The run config a ClientApp receives for an app folder (Flower parses the FAB's pyproject.toml)."""
    return tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_digest_is_stable_and_changes_with_one_character(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(QUICKSTART)
    first = write_app(config, tmp_path / "a", "/runs/q")
    again = write_app(config, tmp_path / "b", "/runs/q")
    digest = approval.read_digest(first)
    assert len(digest) == 64 and digest == approval.read_digest(again) == approval.app_digest(first)
    # what `hsl flower app` prints is what the site computes from the run config it receives
    assert approval.digest_of_run_config(received(first)) == digest
    assert received(first)["hsl-config"] == QUICKSTART
    assert approval.run_digest(QUICKSTART, "/runs/q") == digest

    config.write_text(QUICKSTART.replace("rounds: ", "rounds:  ", 1))  # one more space
    assert approval.read_digest(write_app(config, tmp_path / "c", "/runs/q")) != digest
    assert approval.run_digest(QUICKSTART, "/runs/r") != digest  # another run directory: another run
    assert approval.run_digest(QUICKSTART, "/runs/q", clientapp="evil.app:client") != digest
    # a run-config override of the YAML (flwr run --run-config 'hsl-config=...') is another run too
    assert approval.digest_of_run_config({**received(first), "hsl-config": QUICKSTART + " "}) != digest
    # the timeouts and ckpt-path (a resume) are not part of it
    assert approval.digest_of_run_config({**received(first), "ckpt-path": "last", "timeout-factor": 3}) == digest


def test_approve_appends_a_digest_with_its_note_and_a_broken_file_refuses_everything(tmp_path):
    path = tmp_path / "etc" / "approved.txt"
    one, two = "a" * 64, "0123456789abcdef" * 4
    assert approval.approve(path, one, "quickstart trial")
    assert not approval.approve(path, one.upper())  # listed already
    assert approval.approve(path, two)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and lines[1].startswith(f"{one}  # approved ") and lines[1].endswith(
        ": quickstart trial") and lines[2].startswith(two)
    assert approval.read_approved(path) == {one, two}
    with pytest.raises(HSLError, match="not a run digest"):
        approval.approve(path, "abc")
    with path.open("a") as f:
        f.write("not-a-digest\n")
    with pytest.raises(HSLError, match=r"approved.txt, line 4: 'not-a-digest' is not a run digest"):
        approval.read_approved(path)


def test_hsl_flower_app_prints_the_digest_and_the_command_that_approves_it(tmp_path, capsys):
    from hsl_lightning.flower.commands import main

    config = tmp_path / "run.yaml"
    config.write_text(QUICKSTART)
    main(["app", "--config", str(config), "--out", str(tmp_path / "app"), "--run-dir", "/runs/q"])
    digest = approval.run_digest(QUICKSTART, "/runs/q")
    out = capsys.readouterr().out
    assert f"the run's digest is {digest}" in out and f"hsl flower approve --file /srv/hsl/approved.txt {digest}" in out
    main(["approve", "--file", str(tmp_path / "approved.txt"), digest, "--note", "reviewed"])
    assert approval.read_approved(tmp_path / "approved.txt") == {digest}
    main(["digest", str(tmp_path / "app")])
    assert capsys.readouterr().out.splitlines()[-1] == digest


# the ClientApp's path (hsl_lightning.flower.app._answer) in a fresh process, as a SuperNode runs it
CLIENTAPP = r"""
import json, sys
from pathlib import Path
from types import SimpleNamespace
from hsl_lightning.errors import HSLError
from hsl_lightning.flower import app, protocol, worker

calls = []
def recorder(site_dir, setup, request):
    calls.append(protocol.decode(*request).__class__.__name__)
    return protocol.encode(protocol.Stopped(True))
worker_call, worker.call = worker.call, recorder  # a call that would start the site's worker, recorded

spec = json.loads(sys.argv[1])
out = []
for node_config, run_config, request in spec:
    ctx = SimpleNamespace(node_config=node_config, run_config=run_config)
    before = len(calls)
    try:
        reply = app._answer(getattr(protocol, request[0])(*request[1:]), ctx)
        out.append({"reply": type(reply).__name__, "forwarded": len(calls) > before})
    except HSLError as exc:
        out.append({"error": str(exc), "forwarded": len(calls) > before})
out.append(sorted(m for m in ("torch", "lightning", "jsonargparse") if m in sys.modules))
print(json.dumps(out))
"""


def clientapp(tmp_path, cases) -> list:
    done = subprocess.run([sys.executable, "-c", CLIENTAPP, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_clientapp_refuses_an_unapproved_run_before_any_worker_and_runs_an_approved_one(tmp_path):
    from hsl_lightning.flower import worker

    site_dir = tmp_path / "site"
    approved = tmp_path / "approved.txt"
    run = {"hsl-config": QUICKSTART, "run-dir": "/runs/q"}
    digest = approval.digest_of_run_config(run)
    node = {"node-index": 0, "name": "hospital1", "site-dir": str(site_dir)}
    hello, stop = ["Hello"], ["Stop", 0, "the run failed"]
    cases = [(node, run, hello),                                                  # no approved-runs: refused
             ({**node, "approved-runs": str(tmp_path / "missing.txt")}, run, hello)]  # a file not made yet
    approval.approve(approved, "f" * 64, "another run")
    first = clientapp(tmp_path, cases + [({**node, "approved-runs": str(approved)}, run, hello),  # not listed
                                         ({**node, "approved-runs": str(approved)}, run, stop)])  # honoured
    assert "Site hospital1 refuses run " + digest + ": its node config names no approved-runs file" in first[0]["error"]
    assert 'approved-runs="/srv/hsl/approved.txt"' in first[0]["error"]
    assert f"does not exist. Approve this run after reviewing its configuration: hsl flower approve --file " \
           f"{tmp_path / 'missing.txt'} {digest}" in first[1]["error"]
    assert first[2]["error"] == (f"Site hospital1 refuses run {digest}: the site has not approved it (not in "
                                 f"{approved}). To approve it after reviewing its configuration: hsl flower approve "
                                 f"--file {approved} {digest} (no restart needed)")
    assert not any(case["forwarded"] for case in first[:3])
    assert first[3] == {"reply": "Stopped", "forwarded": False}  # no worker ever ran this run here: nothing to stop
    assert first[-1] == [], "the ClientApp process imported " + ", ".join(first[-1])
    # nothing was started or built for the refused run: no site folder, no worker pid file, no socket
    from types import SimpleNamespace

    from hsl_lightning.flower.app import _site_setup

    run_folder = _site_setup(SimpleNamespace(node_config=node, run_config=run))[0]
    assert not site_dir.exists() and not Path(worker.address_of(run_folder)).exists()
    assert not list(tmp_path.glob("**/worker.pid"))

    run_folder.mkdir(parents=True)  # a worker of this run was started (approved, then revoked): a Stop reaches it
    assert clientapp(tmp_path, [({**node, "approved-runs": str(approved)}, run, stop)])[0] == {
        "reply": "Stopped", "forwarded": True}

    approval.approve(approved, digest)  # approved while the SuperNode runs: its next message proceeds
    evil = {**run, "hsl-config": QUICKSTART.replace("hsl_lightning.SyntheticLesions", "os.system")}
    approval.approve(approved, approval.digest_of_run_config(evil), "approved by mistake")
    then = clientapp(tmp_path, [({**node, "approved-runs": str(approved)}, run, hello),
                                ({**node, "approved-runs": str(approved)}, evil, hello)])
    assert then[0] == {"reply": "Stopped", "forwarded": True}  # the recorder's reply: it reached the worker
    # whatever a site approved, a class outside hsl_lightning is refused before the request is forwarded
    assert then[1]["forwarded"] is False and f"refuses run {approval.digest_of_run_config(evil)}" in then[1]["error"]
    assert "names 'os.system' at data.primary.class_path" in then[1]["error"]
    assert then[-1] == []


TINY = {
    "seed_everything": 3,
    "model": {"class_path": "hsl_lightning.ClassifierModule", "init_args": {"backbone": "test_resnet"}},
    "data": {"primary": {"class_path": "hsl_lightning.SyntheticLesions", "init_args": {"num_samples": 60, "size": 28}},
             "sat": {"class_path": "hsl_lightning.SyntheticAnchor", "init_args": {"num_samples": 60, "size": 28}},
             "scenario": {"num_nodes": 3}, "batch_size": 32, "splits": "pooled"},
    "federation": {"strategy": "fedavg", "rounds": 1, "local_epochs": 1, "progress": False, "wandb": "disabled"},
}


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module on the import path that creates a file when it is imported, and a class in it."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "hsl_evil_mod.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "class Thing:\n    def __init__(self, *args, **kwargs):\n        pass\n")
    (tmp_path / "sub.yaml").write_text("data:\n  primary: {class_path: hsl_evil_mod.Thing}\n")  # a whole config
    (tmp_path / "source.yaml").write_text("class_path: hsl_evil_mod.Thing\n")  # one class-typed field's value
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    sys.modules.pop("hsl_evil_mod", None)
    return marker


def variant(change) -> str:
    config = json.loads(json.dumps(TINY))
    change(config)
    return yaml.safe_dump(config)


BAD = {  # what a run names, and the fragment of the refusal that names it
    "os.system": (lambda c: c["model"].update(class_path="os.system"), "'os.system' at model.class_path"),
    "builtins.eval": (lambda c: c["model"].update(class_path="builtins.eval"), "'builtins.eval' at model.class_path"),
    "nested-in-init-args": (lambda c: c["data"]["primary"]["init_args"].update(
        transform={"class_path": "hsl_evil_mod.Thing", "init_args": {"x": 1}}),
        "'hsl_evil_mod.Thing' at data.primary.init_args.transform.class_path"),
    "string-form": (lambda c: c["data"].update(primary="hsl_evil_mod.Thing"), "'hsl_evil_mod.Thing' at data.primary"),
    "through-an-hsl-module": (lambda c: c["model"].update(
        class_path="hsl_lightning.flower.localhost.subprocess.Popen", init_args={"args": ["true"]}),
        "'hsl_lightning.flower.localhost.subprocess.Popen' at model.class_path"),
    "under-any-key": (lambda c: c["federation"].update(
        strategy_options={"x": {"y": [{"class_path": "hsl_evil_mod.Thing"}]}}),
        "'hsl_evil_mod.Thing' at federation.strategy_options.x.y.[0].class_path"),
    "yaml-in-a-string": (lambda c: c["federation"].update(strategy_options={"x": "{class_path: hsl_evil_mod.Thing}"}),
                         "'hsl_evil_mod.Thing' at federation.strategy_options.x.class_path"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_class_outside_hsl_lightning_is_refused_before_anything_is_imported(tmp_path, evil_module, case):
    from hsl_lightning.flower.site import Site

    change, named = BAD[case]
    with pytest.raises(HSLError, match="Site hospital2 refuses the run: its configuration names") as refused:
        Site(variant(change), 1, tmp_path / "site", name="hospital2")
    assert named in str(refused.value) and "only hsl_lightning's own classes" in str(refused.value)
    assert not evil_module.exists() and "hsl_evil_mod" not in sys.modules
    assert not (tmp_path / "site").exists()  # not even the run's YAML was written


def test_the_sites_data_config_and_included_files_are_checked_too(tmp_path, evil_module):
    from hsl_lightning.flower.site import Site

    data = "data:\n  sat:\n    class_path: hsl_evil_mod.Thing\n"
    with pytest.raises(HSLError, match=r"its data config names 'hsl_evil_mod.Thing' at data.sat.class_path"):
        Site(yaml.safe_dump(TINY), 0, tmp_path / "site", data_config=data, name="hospital1")
    with pytest.raises(HSLError, match=r"at config: a site does not read other configuration files"):
        Site(yaml.safe_dump({**TINY, "config": str(tmp_path / "sub.yaml")}), 0, tmp_path / "site")
    with pytest.raises(HSLError, match=r"names '.*source.yaml' at data.primary: not one of hsl_lightning's classes"):
        Site(variant(lambda c: c["data"].update(primary=str(tmp_path / "source.yaml"))), 0, tmp_path / "site")
    assert not evil_module.exists()
    # the ClientApp's check imports nothing; the site's also resolves each class (only hsl_lightning's modules)
    assert sorted(approval.check_site_config(yaml.safe_dump(TINY), None, "x")) == [
        "hsl_lightning.ClassifierModule", "hsl_lightning.SyntheticAnchor", "hsl_lightning.SyntheticLesions"]


def test_jsonargparse_imports_only_hsl_lightning_at_a_site_even_past_the_static_check(tmp_path, evil_module):
    """The second line: a sub-configuration file (which the static check cannot read) naming another
    module is refused by jsonargparse's import allow-list before the module is imported."""
    from hsl_lightning.flower.site import read_config

    config = tmp_path / "run.yaml"
    config.write_text(variant(lambda c: c["data"].update(primary=str(tmp_path / "source.yaml"))))
    with approval.hsl_imports_only(), pytest.raises(SystemExit):
        read_config(["--config", str(config)])
    assert not evil_module.exists() and "hsl_evil_mod" not in sys.modules
    config.write_text(yaml.safe_dump(TINY))
    with approval.hsl_imports_only():
        cli = read_config(["--config", str(config)])
    assert type(cli.model).__name__ == "ClassifierModule"
    from jsonargparse import _common

    assert _common.parsing_settings["import_paths_enforced"] is False  # restored for the rest of the process
