"""A deployment's two sides in one process (no SuperLink): the simulator's numbers, faults, restarts.

The sites answer the server's requests in process (``LocalSites``), through the same protocol the
Flower messages carry; tests/test_flower_deploy.py runs the real thing over TLS.
"""

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from hsl_lightning.config import HSLCLI
from hsl_lightning.errors import HSLError
from hsl_lightning.flower import protocol
from hsl_lightning.flower.server import LocalSites, SitePhases
from hsl_lightning.flower.site import Site

TINY = {
    "seed_everything": 3,
    "model": {"class_path": "hsl_lightning.ClassifierModule", "init_args": {"backbone": "test_resnet"}},
    "data": {"primary": {"class_path": "hsl_lightning.SyntheticLesions", "init_args": {"num_samples": 180, "size": 28}},
             "sat": {"class_path": "hsl_lightning.SyntheticAnchor", "init_args": {"num_samples": 120, "size": 28}},
             "scenario": {"num_nodes": 3, "feature_skew": 0.3}, "batch_size": 32, "splits": "pooled"},
    "federation": {"strategy": "fedavg", "rounds": 2, "local_epochs": 1, "progress": False, "wandb": "disabled"},
}


def config_for(strategy: str, **federation) -> dict:
    config = json.loads(json.dumps(TINY))
    config["federation"].update(strategy=strategy, **federation)
    if strategy == "hsl":
        config["model"] = {"class_path": "hsl_lightning.HSLModule",
                           "init_args": {"backbone": "test_resnet", "num_experts": 4, "proj_dim": 64}}
    if strategy == "scaffold":
        config["model"]["init_args"].update(optimizer="sgd", lr=0.05, weight_decay=0.0)
    return config


def simulate(config: dict, run_dir: Path) -> dict:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = HSLCLI(args=["--config", str(path), "--federation.run_dir", str(run_dir)], run=False)
    return cli.trainer.fit(cli.model, cli.datamodule)


@functools.lru_cache(maxsize=1)
def consortium() -> Path:
    """Node keys for sites site0..site4 and the folder of their public keys (made once per session)."""
    from hsl_lightning.flower.keys import make_keys

    folder = Path(tempfile.mkdtemp(prefix="hsl-keys-")) / "keys"
    atexit.register(shutil.rmtree, folder.parent, True)  # gone with the test process, not left in /tmp
    make_keys(folder, [f"site{i}" for i in range(5)], [])
    return folder


def keyed(i: int) -> dict:
    """Site i's node key and the consortium's public keys: what secure aggregation signs and checks with."""
    return {"node_key": consortium() / f"site{i}", "roster": consortium()}


def sites_for(config: dict, root: Path, site_type=Site) -> list:
    text = yaml.safe_dump(config)
    return [site_type(text, i, root / f"site{i}", **keyed(i)) for i in range(config["data"]["scenario"]["num_nodes"])]


def deploy(config: dict, run_dir: Path, sites, ckpt_path=None) -> dict:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = HSLCLI(args=["--config", str(path), "--federation.run_dir", str(run_dir)], run=False)
    transport = sites if isinstance(sites, LocalSites) else LocalSites(sites)
    return SitePhases(cli.trainer, transport).fit(cli.model, ckpt_path=ckpt_path)


def deployed_weights(run_dir: Path, summary: dict) -> dict:
    """Every node's deployed state dict: the run's model.ckpt, or the site-held nodes/<name>.ckpt."""
    held = summary.get("deployment", {}).get("site_checkpoints", {})
    out = {}
    for node in summary["nodes"]:
        name = node["name"]
        path = Path(held[name]) if name in held else run_dir / "nodes" / f"{name}.ckpt"
        path = path if path.is_file() else run_dir / "model.ckpt"
        out[name] = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return out


def assert_same(sim: dict, sim_dir: Path, dep: dict, dep_dir: Path) -> None:
    assert dep["best_round"] == sim["best_round"] and dep["rounds_run"] == sim["rounds_run"]
    assert dep["threads_per_institution"] == sim["threads_per_institution"]  # the sites', not the server's
    for a, b in zip(sim["nodes"], dep["nodes"]):
        assert (a["name"], a["val_auc"], a["test_auc"], a["n_train"]) == (b["name"], b["val_auc"], b["test_auc"],
                                                                          b["n_train"])
    for ha, hb in zip(sim["history"], dep["history"]):
        assert {k: v for k, v in ha.items() if k != "round_s"} == {k: v for k, v in hb.items() if k != "round_s"}
    ws, wd = deployed_weights(sim_dir, sim), deployed_weights(dep_dir, dep)
    for name in ws:
        assert ws[name].keys() == wd[name].keys()
        for key in ws[name]:
            assert torch.equal(ws[name][key], wd[name][key]), (name, key)


@pytest.mark.parametrize("strategy", ["fedavg", *(pytest.param(s, marks=pytest.mark.slow) for s in
                                                ("hsl", "fedprox", "scaffold", "fedbn", "ditto", "local"))])
def test_a_deployment_gives_the_simulators_numbers_bit_for_bit(tmp_path, strategy):
    config = config_for(strategy)
    sim = simulate(config, tmp_path / "sim")
    dep = deploy(config, tmp_path / "dep", sites_for(config, tmp_path / "sites"))
    assert_same(sim, tmp_path / "sim", dep, tmp_path / "dep")
    one_model = (tmp_path / "sim" / "model.ckpt").is_file()
    assert (tmp_path / "dep" / "model.ckpt").is_file() == one_model
    if not one_model:  # FedBN's BatchNorm, Ditto's personal model, local's whole model: held by the sites only
        assert not (tmp_path / "dep" / "nodes").exists()
        assert len(dep["deployment"]["site_checkpoints"]) == 3


@pytest.mark.slow
def test_dp_fedavg_runs_in_deployment_with_its_epsilon(tmp_path):
    """DP noise is drawn fresh from os.urandom at every site, so a DP deployment cannot repeat the
    simulator bit for bit (the runs without DP above still do): the accounting, the history's keys and
    round 1's update norms (measured before any noise) still agree; the deployed weights must not."""
    config = config_for("fedavg", privacy={"clip": 1.0, "noise_multiplier": 0.5})
    sim = simulate(config, tmp_path / "sim")
    dep = deploy(config, tmp_path / "dep", sites_for(config, tmp_path / "sites"))
    assert dep["privacy"]["epsilon"] == sim["privacy"]["epsilon"] and 0 < dep["privacy"]["epsilon"] < float("inf")
    assert dep["privacy"]["noise"] == sim["privacy"]["noise"] == "os.urandom"
    assert dep["rounds_run"] == sim["rounds_run"] and len(dep["history"]) == len(sim["history"])
    assert [sorted(h) for h in dep["history"]] == [sorted(h) for h in sim["history"]]
    norms = ("dp_update_norm_median", "dp_update_norm_max", "dp_clipped_share")
    assert [dep["history"][0][k] for k in norms] == [sim["history"][0][k] for k in norms]
    ws, wd = deployed_weights(tmp_path / "sim", sim), deployed_weights(tmp_path / "dep", dep)
    assert any(not torch.equal(ws[name][key], wd[name][key]) for name in ws for key in ws[name])  # fresh noise


class FailingSite(Site):
    """Site 1's training fails in round 2 (``vanish`` false) or its answer to that request never comes."""

    vanish = False

    def handle(self, request):
        if isinstance(request, protocol.Round) and request.completed == 1 and request.train and self.node == 1:
            if self.vanish:
                raise HSLError("stopped answering: no reply within 300 s")
            raise HSLError(f"Site {self.name}: local training failed in round 2: out of memory")
        return super().handle(request)


def failing_sites(config, root, vanish=False):
    sites = sites_for(config, root, FailingSite)
    for site in sites:
        site.vanish = vanish
    return sites


def test_a_failing_site_stops_the_run_naming_it_or_drops_out_with_min_nodes(tmp_path):
    config = config_for("fedavg", rounds=3)
    transport = LocalSites(failing_sites(config, tmp_path / "sa"))
    with pytest.raises(HSLError, match=r"site 1 \(site1\) failed in round 2: local training failed in round 2: out "
                                       r"of memory\. Set federation.min_nodes"):
        deploy(config, tmp_path / "a", transport)
    # every site is told why the run stopped, in the coordinator's words, the failed one too
    stops = [(i, m.reason) for i, m in transport.sent if isinstance(m, protocol.Stop)]
    assert [i for i, _ in stops] == [0, 1, 2] and all("site 1 (site1) failed in round 2" in r for _, r in stops)

    config = config_for("fedavg", rounds=3, min_nodes=2)
    transport = LocalSites(failing_sites(config, tmp_path / "sb", vanish=True))
    dep = deploy(config, tmp_path / "b", transport)
    assert list(dep["deployment"]["failed"]) == ["1"] and "stopped answering" in dep["deployment"]["failed"]["1"]
    assert [h["nodes_dropped"] for h in dep["history"]] == [0, 1, 1]
    assert dep["nodes"][1]["test_auc"] != dep["nodes"][1]["test_auc"]  # NaN: the site never answered again
    assert "stopped answering" in dep["nodes"][1]["failed"]  # its row stays, with the reason
    assert dep["nodes"][0]["test_auc"] == dep["nodes"][0]["test_auc"]
    # the dropped site was told at once, and asked nothing after
    told = [k for k, (i, m) in enumerate(transport.sent) if i == 1 and isinstance(m, protocol.Stop)]
    assert len(told) == 1 and "left the run in round 2" in transport.sent[told[0]][1].reason
    assert not any(i == 1 for i, m in transport.sent[told[0] + 1:])


class BrokenSite(Site):
    """A site whose data turns out unreadable when it builds it (the Hello)."""

    def hello(self, request=None):
        raise HSLError(f"Site {self.name} failed building its data: images/7.png is truncated")


@pytest.mark.slow
def test_a_site_that_fails_at_start_keeps_its_row_with_the_reason(tmp_path, capsys):
    config = config_for("fedavg", rounds=2, min_nodes=2)
    sites = sites_for(config, tmp_path / "s")
    sites[2] = BrokenSite(yaml.safe_dump(config), 2, tmp_path / "s" / "site2", **keyed(2))
    dep = deploy(config, tmp_path / "dep", sites)
    assert [n["name"] for n in dep["nodes"]] == ["node0", "node1", "node2"]
    row = dep["nodes"][2]
    assert row["test_auc"] != row["test_auc"] and "images/7.png is truncated" in row["failed"]
    table = capsys.readouterr().out
    assert "node2" in table and "failed: " in table and "truncated" in table
    # without min_nodes the run stops, and the broken site's operator is told why
    config = config_for("fedavg", rounds=2)
    sites[2] = BrokenSite(yaml.safe_dump(config), 2, tmp_path / "t" / "site2", **keyed(2))
    transport = LocalSites(sites)
    with pytest.raises(HSLError, match=r"site 2 failed in round 1: .*truncated"):
        deploy(config, tmp_path / "dep2", transport)
    assert any(i == 2 and isinstance(m, protocol.Stop) and "truncated" in m.reason for i, m in transport.sent)


def test_a_site_with_missing_data_fails_with_a_message_naming_it(tmp_path):
    config = config_for("fedavg")
    data = {"data": {"primary": {"class_path": "hsl_lightning.ImageFolders",
                                 "init_args": {"root": str(tmp_path / "no-such-folder")}}}}
    with pytest.raises(HSLError, match=r"Site hospital2 failed building its data: .*no-such-folder"):
        Site(yaml.safe_dump(config), 1, tmp_path / "s", yaml.safe_dump(data), name="hospital2")
    from hsl_lightning.flower.nodeconfig import load_site_config

    with pytest.raises(HSLError, match="does not exist"):
        load_site_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("data: [unclosed")
    with pytest.raises(HSLError, match="not valid YAML"):
        load_site_config(tmp_path / "broken.yaml")


class Crash(Exception):
    pass


class CrashingSites(LocalSites):
    """Sites whose server crashes when it asks for round ``at``."""

    def __init__(self, sites, at):
        super().__init__(sites)
        self.at = at

    def exchange(self, requests, timeout_s):
        if any(getattr(r, "completed", None) == self.at for r in requests.values()):
            raise Crash
        return super().exchange(requests, timeout_s)


@pytest.mark.slow
def test_a_restarted_server_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    config = config_for("scaffold", rounds=3)  # control variates on both sides must survive the restart
    whole = deploy(config, tmp_path / "whole", sites_for(config, tmp_path / "s1"))
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = HSLCLI(args=["--config", str(path), "--federation.run_dir", str(tmp_path / "cut")], run=False)
    with pytest.raises(Crash):
        SitePhases(cli.trainer, CrashingSites(sites_for(config, tmp_path / "s2"), at=2)).fit(cli.model)
    # the server comes back (and so do the sites, as fresh processes reading their own directories)
    resumed = deploy(config, tmp_path / "cut", sites_for(config, tmp_path / "s2"), ckpt_path="last")
    assert_same(whole, tmp_path / "whole", resumed, tmp_path / "cut")


def test_strategies_that_need_every_contribution_are_refused(tmp_path):
    with pytest.raises(HSLError, match="merges with Server"):
        Site(yaml.safe_dump(config_for("fedcome")), 0, tmp_path / "s")


def test_a_deployed_round_trip_is_split_into_flowers_stages_and_the_sites_work():
    """The server splits the round trip of the reply it waited for (the last to arrive) into
    delivery, ClientApp start, the site's work and the way back; the stages add up to the trip."""
    import psutil  # in the dev environment (through ipython)

    from hsl_lightning.flower.app import _process_started

    started = _process_started()
    assert started is not None and started <= time.time()
    assert abs(started - psutil.Process().create_time()) < 0.05

    deployed = SitePhases.__new__(SitePhases)
    deployed.timing = {}
    slow = {"pushed": 100.0, "spawned": 101.5, "entered": 103.0, "left": 110.0, "pulled": 110.75}
    fast = {"pushed": 100.0, "spawned": 100.2, "entered": 100.9, "left": 104.0, "pulled": 104.5}
    deployed._time_stages({0: protocol.Stopped(True, clock=fast, busy_s=3.0),
                           1: protocol.Stopped(True, clock=slow, busy_s=6.0), 2: protocol.Failure("x")})
    stages = {"deliver": 1.5, "clientapp_start": 1.5, "handover": 1.0, "site_work": 6.0, "return": 0.75}
    assert deployed.timing == {"timed_requests": 1, **{f"{k}_s": v for k, v in stages.items()}, "stages": [stages]}
    deployed._time_stages({0: protocol.Stopped(True)})  # the in-process sites carry no clock
    assert deployed.timing["timed_requests"] == 1


def test_the_superlink_certificate_always_names_this_machine(tmp_path):
    """Flower's SuperExec reaches its SuperLink at 127.0.0.1 over TLS: a certificate made only for the
    sites' name (superlink.example.org) would leave the SuperLink unable to run anything."""
    from cryptography import x509

    from hsl_lightning.flower.keys import make_keys

    make_keys(tmp_path, ["hospital1"], ["superlink.example.org"])
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    listed = [str(n.value) for n in names]
    assert listed == ["superlink.example.org", "localhost", "127.0.0.1", "::1"]


@pytest.mark.slow
def test_the_clientapp_forwards_a_message_without_importing_torch(tmp_path):
    """Flower starts a ClientApp process per message: reading the node config and the site's data
    config there must not import torch or Lightning (that cost 20 s per message under load)."""
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  primary: {init_args: {root: " + str(tmp_path) + "}}\n")
    code = ("import sys\nfrom types import SimpleNamespace\nfrom hsl_lightning.flower.app import _site_setup\n"
            f"ctx = SimpleNamespace(node_config={{'node-index': 1, 'data-config': {str(data)!r}}}, "
            "run_config={'hsl-config': 'x: 1'})\n"
            "site_dir, setup, persistent = _site_setup(ctx)\n"
            "heavy = sorted(m for m in ('torch', 'lightning') if m in sys.modules)\n"
            "print(setup['node'], persistent, heavy)\n")
    code += ("ctx.run_config['run-dir'] = '/runs/b'\n"
             "assert _site_setup(ctx)[0] != site_dir  # another run of the same YAML keeps its own state\n"
             "ctx.run_config['run-dir'] = ''\n"
             "assert _site_setup(ctx)[0] == site_dir  # the same run (a resumed one) finds it again\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1 True []"


@pytest.mark.slow
def test_hsl_flower_commands_start_without_torch(tmp_path):
    """A hospital's IT staff run ``hsl flower keys`` and ``hsl flower supernode``: the ``hsl`` command
    must not load torch or Lightning for them (that took 10 s per command on a 2-core machine)."""
    code = ("import sys\nfrom hsl_lightning.cli import main\n"
            f"main(['flower', 'keys', '--out', {str(tmp_path / 'keys')!r}, '--sites', 'hospital1'])\n"
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))\n"
            "from hsl_lightning.cli import HSLCLI\n"
            "print(HSLCLI.__name__, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["[]", "HSLCLI True"]
    assert (tmp_path / "keys" / "hospital1").is_file()


def test_the_supernode_check_names_a_data_folder_that_does_not_exist(tmp_path):
    from hsl_lightning.flower.commands import check_data

    data = tmp_path / "data.yaml"
    data.write_text(f"data:\n  primary:\n    init_args: {{root: {tmp_path / 'images'}}}\n"
                    f"  sat:\n    init_args: {{flag: breastmnist, root: {tmp_path}}}\n")
    with pytest.raises(HSLError, match=r"Site hospital2: the data config .* names .*images, which does not exist"):
        check_data({"data-config": str(data)}, "hospital2")
    (tmp_path / "images").mkdir()
    check_data({"data-config": str(data)}, "hospital2")  # every named folder exists now
    data.write_text(f"data:\n  sat:\n    init_args: {{flag: breastmnist, root: {tmp_path / 'new'}, download: true}}\n")
    check_data({"data-config": str(data)}, "hospital2")  # a download creates its own root


@pytest.mark.slow
def test_a_stopped_run_stops_the_sites_worker_and_never_starts_one(tmp_path):
    """After a failed run the server sends 'stop': a site's worker (its data and model in memory)
    exits at once instead of idling for IDLE_S; a site without a worker does not start one for it."""
    from hsl_lightning.flower import worker

    site_dir = tmp_path / "site"
    process = subprocess.Popen([sys.executable, "-m", "hsl_lightning.flower.worker", str(site_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not Path(worker.address_of(site_dir)).exists():
            assert process.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        reply = worker.call(site_dir, {}, protocol.encode(protocol.Stop(2, "the run failed")))
        assert protocol.decode(*reply) == protocol.Stopped(True)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert protocol.decode(*worker.call(site_dir, {}, protocol.encode(protocol.Stop(2, "x")))) == protocol.Stopped(False)
    assert not Path(worker.address_of(site_dir)).exists()


@pytest.mark.slow
def test_sites_holding_only_their_own_image_folders_give_the_simulators_numbers(tmp_path):
    """Real hospitals: every site's root holds only its own folder (ImageFolders with the federation's
    node list); the deployment equals hsl fit on one root holding every folder, bit for bit, except
    the pool figure, which needs every node's test images and so is left out."""
    import shutil

    import numpy as np
    from PIL import Image

    names = ["hospital_a", "hospital_b", "hospital_c"]
    full, rng = tmp_path / "all", np.random.default_rng(0)
    for k, name in enumerate(names):
        for split, per_label in (("train", 12 + 4 * k), ("test", 5)):
            for label in (0, 1):
                folder = full / name / split / str(label)
                folder.mkdir(parents=True)
                for j in range(per_label):  # positives carry a bright square: a learnable task
                    pixels = rng.integers(0, 160, (28, 28))
                    if label:
                        pixels[8:20, 8:20] += 90
                    Image.fromarray(pixels.astype(np.uint8), mode="L").save(folder / f"{j}.png")
    config = config_for("fedavg")
    config["data"] = {"primary": {"class_path": "hsl_lightning.ImageFolders",
                                  "init_args": {"root": str(full), "nodes": names, "size": 28}},
                      "sat": TINY["data"]["sat"], "batch_size": 16}
    sim = simulate(config, tmp_path / "sim")
    sites = []
    for i, name in enumerate(names):
        own = tmp_path / f"site{i}" / "images"
        shutil.copytree(full / name, own / name)
        data = yaml.safe_dump({"data": {"primary": {"class_path": "hsl_lightning.ImageFolders",
                                                    "init_args": {"root": str(own)}}}})
        sites.append(Site(yaml.safe_dump(config), i, tmp_path / f"site{i}" / "state", data_config=data, **keyed(i)))
    dep = deploy(config, tmp_path / "dep", sites)
    assert_same(sim, tmp_path / "sim", dep, tmp_path / "dep")
    assert [n["n_train"] for n in dep["nodes"]] == [n["n_train"] for n in sim["nodes"]]
    assert dep["mean_test_auc"] == sim["mean_test_auc"] > 0.6  # a learnt task, not constant outputs
    assert sim["mean_pool_test_auc"] == sim["mean_pool_test_auc"]  # the simulator has every test image
    assert dep["mean_pool_test_auc"] != dep["mean_pool_test_auc"]  # a site has only its own: no pool figure

    with pytest.raises(HSLError, match="Node 'hospital_c' has no folder here"):
        Site(yaml.safe_dump(config), 2, tmp_path / "wrong" / "state",
             data_config=yaml.safe_dump({"data": {"primary": {"init_args": {"root": str(tmp_path / "site0" / "images")}}}}))
