"""The same federation simulated (``hsl fit``) and deployed on Flower (a SuperLink and 3 SuperNodes
on this machine, TLS and node authentication on), in one run; prints one line ``RESULT {json}``.

    .venv/bin/python benchmarks/flower_deploy.py [--config configs/quickstart.yaml] [--rounds 4] [--own-folders]
        [--secure-aggregation on|off] [--no-proxy]

``--own-folders``: hospitals that keep their own images (the config's images, written as one PNG
folder per hospital; the simulator reads every folder, each site only its own).

Keys: ``same_as_simulation`` (deployed weights and every node's validation and test AUC equal to
the simulator's, bit for bit), ``max_abs_weight_diff``, ``auc_sim`` / ``auc_deploy`` (mean node
test AUC), ``round_s_sim`` / ``round_s_deploy`` (seconds per round: the run's summed round times
over its rounds; a deployed round also carries the next round's training, which the simulator
counts in its next round, so the sums compare), ``startup_s_deploy`` (the rest of the deployment's
wall time: submitting the app, starting the ServerApp, the sites' workers importing and building
their data once, the final scoring), ``superlink_start_s``, ``transport_s_per_request`` (per
request to the sites, i.e. the rounds plus the opening and closing requests: the server's waiting
beyond the slowest site's own work),
``stages_s_per_request`` (the round trip the server waited for, per request, split at the
timestamps the ClientApp adds: ``deliver`` from the server's push to the start of the ClientApp
process Flower launches for the message (the SuperNode's 3 s idle polling, the SuperExec's task
polling, the transfer), ``clientapp_start`` (that process's imports and the message handed over), ``handover`` (our
ClientApp's decoding and its socket to the site's worker, which starts on the run's first request),
``site_work`` (the site's own work), ``return`` (the reply's way back: the SuperNode's 0.5 s reply
polling, the transfer, the server's 0.1 s polling)), ``flower_share`` (the share of those round
trips spent in Flower: delivery, ClientApp start and return), ``stages`` (every request's stages),
``bytes_per_site_round`` (arrays and JSON a site sends and receives per round), ``unregistered_refused`` (a
SuperNode with a key the SuperLink does not know is refused while the run goes on), ``tls``
(the SuperLink answers only TLS, with the consortium CA's certificate), ``secure_aggregation``
(whether the sites' replies were masked: on by default, ``--secure-aggregation off`` runs the same
config without it, to compare), ``secagg_s_per_round`` (the slowest site's masking plus the
coordinator's unmasking, per round; ``secagg_share_of_round`` of the deployed round), ``secagg_setup_s``
(the key exchange once per run), ``bytes_to_site_per_round`` / ``bytes_from_site_per_round`` (each
direction apart, all of a run's requests over its rounds and sites; ``to_site_ratio`` /
``from_site_ratio``: over ``state_bytes``, the shared state's size in its own dtypes, float32),
``secagg_bytes_per_site_round`` (what a site sends per round with masking: its masked reply),
``quantisation_max_abs_error`` (round 1's fixed-point sum against the float64 sum of the same
contributions; ``quantisation_bound``: the derived bound), ``control_api_blocked_for_sites`` (the (the
sites reach the SuperLink through the proxy of ``hsl flower proxy``, which refuses a Control API
request, list-runs, while the run works; the same request straight at the SuperLink, on 127.0.0.1,
answers; with ``--no-proxy`` the sites connect to the SuperLink directly and it is false),
``unapproved_run_refused`` (an app no site approved, submitted after the run: every site refuses it
before starting a worker, naming its digest, and it writes no ``summary.json``). Also
``calibration``: this machine's images/s (benchmarks/calibrate.py), for comparing timings across
machines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
REPO = Path(__file__).resolve().parents[1]


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def plain_http_refused(address: str) -> bool:
    """True when a plain-HTTP request gets no HTTP answer (the SuperLink speaks TLS only) or only
    nginx's 400 (*The plain HTTP request was sent to HTTPS port*)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /v1/fleet HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        try:
            answer = sock.recv(64)
        except (TimeoutError, ConnectionResetError):
            return True
    return not answer.startswith(b"HTTP/") or answer.split(b" ")[1:2] == [b"400"]


def compare(sim: Path, dep: Path) -> tuple[bool, float]:
    """Deployed weights and AUCs against the simulator's (site-held weights for per-node models)."""
    s, d = (json.loads((p / "summary.json").read_text()) for p in (sim, dep))
    same = all(a[k] == b[k] for a, b in zip(s["nodes"], d["nodes"]) for k in ("val_auc", "test_auc"))
    same = same and s["best_round"] == d["best_round"]
    if (sim / "model.ckpt").is_file():
        diff = max_diff(weights(sim / "model.ckpt"), weights(dep / "model.ckpt"))
    else:
        held = d["deployment"]["site_checkpoints"]
        diff = max(max_diff(weights(sim / "nodes" / f"{n}.ckpt"), weights(Path(held[n]))) for n in held)
    return same and diff == 0.0, diff


def per_round(summary: dict) -> float:
    return sum(h["round_s"] for h in summary["history"]) / len(summary["history"])


def own_folders(config: dict, work: Path) -> list[str]:
    """Write the config's images (each node's splits, as its scanner saw them) as one PNG folder per
    hospital, switch ``config`` to ``ImageFolders`` over all of them (for the simulator), and give
    each site a data config whose root holds only its own folder. Returns the sites' node-config
    additions."""
    import numpy as np
    from PIL import Image

    from hsl_lightning.flower.site import read_config

    path = work / "source.yaml"
    path.write_text(yaml.safe_dump(config))
    dm = read_config(["--config", str(path)]).datamodule
    dm.setup("fit")
    if dm.in_chans != 1:
        raise SystemExit("--own-folders writes grey PNGs; this config's images have several channels.")
    names, extra = [node.name for node in dm.nodes], []
    for i, node in enumerate(dm.nodes):
        for split in ("train", "val", "test"):
            data = node.split(split)
            for j, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
                folder = work / f"site{i}" / "images" / node.name / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(image[0].numpy()), mode="L").save(folder / f"{j}.png")  # uint8
        site_yaml = work / f"site{i}" / "data.yaml"
        site_yaml.write_text(yaml.safe_dump({"data": {"primary": {"init_args": {"root": str(work / f"site{i}" / "images")}}}}))
        extra.append(f'data-config="{site_yaml}"')
        everything = work / "all" / node.name
        if not everything.exists():
            everything.parent.mkdir(parents=True, exist_ok=True)
            everything.symlink_to(work / f"site{i}" / "images" / node.name)
    config["data"]["primary"] = {"class_path": "hsl_lightning.ImageFolders",
                                 "init_args": {"root": str(work / "all"), "nodes": names, "size": dm.size}}
    config["data"].pop("scenario", None)  # the images carry their scanners already
    return extra


def main() -> None:
    from hsl_lightning.flower.commands import check_tls
    from hsl_lightning.flower.localhost import Localhost
    from hsl_lightning.flower.proxy import http_status

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    parser.add_argument("--workdir", default=None, help="keep the deployment's files here (default: a temp folder)")
    parser.add_argument("--own-folders", action="store_true",
                        help="hospitals that keep their own images: the config's images written as one PNG folder "
                             "per hospital; the simulator reads them all, each site only its own")
    parser.add_argument("--secure-aggregation", choices=["on", "off"], default="on",
                        help="off: the same run with federation.secure_aggregation false, to measure what masking costs")
    parser.add_argument("--no-proxy", action="store_true",
                        help="the sites connect to the SuperLink directly, not through nginx (hsl flower proxy)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hsl-flower-"))
    config = yaml.safe_load(Path(args.config).read_text())
    config.setdefault("federation", {}).update({"progress": False, "wandb": "disabled"})
    if args.rounds:
        config["federation"]["rounds"] = args.rounds
    if args.secure_aggregation == "off":
        config["federation"]["secure_aggregation"] = False
    work.mkdir(parents=True, exist_ok=True)
    data_configs = own_folders(config, work) if args.own_folders else [""] * 3
    run_yaml = work / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config, sort_keys=False))

    sim_dir, dep_dir = work / "sim", work / "deploy"
    clock = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "hsl"), "fit", "--config", str(run_yaml),
                    "--federation.run_dir", str(sim_dir)], check=True, capture_output=True)
    sim_wall = time.perf_counter() - clock

    with Localhost(work / "deployment", proxy=False if args.no_proxy else None) as lh:
        lh.make_keys()
        lh.run(str(Path(sys.executable).parent / "hsl"), "flower", "keys", "--out", str(lh.keys / "intruder"),
               "--sites", "intruder")
        superlink_s = lh.start_superlink()
        for site in lh.sites:
            lh.register(site)
        for i in range(len(lh.sites)):
            lh.start_supernode(i, extra=data_configs[i])
        intruder = lh.start_supernode(len(lh.sites), key="intruder/intruder")
        clock = time.perf_counter()
        done = lh.submit(run_yaml, dep_dir, timeout=3600)
        deploy_wall = time.perf_counter() - clock
        try:
            intruder.wait(60)
        except subprocess.TimeoutExpired:
            pass
        refused = intruder.poll() not in (None, 0)
        tls = plain_http_refused(lh.address) and plain_http_refused(lh.superlink_address)
        ca = lh.keys / "ca.crt"  # list-runs: through the sites' address, and at the SuperLink on 127.0.0.1
        control = (http_status(lh.address, "/v1/control/list-runs", ca),
                   http_status(lh.superlink_address, "/v1/control/list-runs", ca))
        check_tls(lh.address, lh.keys / "ca.crt", "benchmark")  # raises unless the CA vouches for the SuperLink
        # the same YAML into another run directory (another digest), which no site approved
        unapproved = lh.submit_unapproved(run_yaml, work / "unapproved", timeout=600)
    if not (dep_dir / "summary.json").is_file():
        raise SystemExit(f"the deployment did not finish:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    sim, dep = (json.loads((p / "summary.json").read_text()) for p in (sim_dir, dep_dir))
    same, diff = compare(sim_dir, dep_dir)
    traffic = json.loads((dep_dir / "deployment" / "traffic.json").read_text())
    rounds, sites = len(dep["history"]), len(dep["nodes"])
    timing = dep["deployment"]
    stages = {key[:-2]: round(timing.get(key, 0.0) / max(1, timing.get("timed_requests", 0)), 2)
              for key in ("deliver_s", "clientapp_start_s", "handover_s", "site_work_s", "return_s")}
    flower = stages["deliver"] + stages["clientapp_start"] + stages["return"]
    state_bytes = dep["bytes_sent_per_node_per_round"]  # the shared state in its entries' own dtypes (float32)
    quantisation = (None, None)
    if timing.get("secure_aggregation"):  # round 1's fixed-point sum against the float64 sum of the same parts
        sys.path.insert(0, str(REPO / "benchmarks"))
        from secure_aggregation import first_round_error

        quantisation = first_round_error(run_yaml, int(config.get("seed_everything", 0)), work / "quantisation")
    calibration = subprocess.run([sys.executable, str(REPO / "benchmarks" / "calibrate.py")], capture_output=True,
                                 text=True).stdout.strip().splitlines()
    result = {
        "same_as_simulation": same, "max_abs_weight_diff": diff,
        "auc_sim": sim["mean_test_auc"], "auc_deploy": dep["mean_test_auc"],
        "round_s_sim": round(per_round(sim), 2), "round_s_deploy": round(per_round(dep), 2),
        "startup_s_deploy": round(deploy_wall - sum(h["round_s"] for h in dep["history"]), 2),
        "superlink_start_s": round(superlink_s, 2), "sim_wall_s": round(sim_wall, 2),
        "deploy_wall_s": round(deploy_wall, 2),
        "transport_s_per_request": round(dep["deployment"]["transport_s"] / max(1, dep["deployment"]["requests"]), 2),
        "stages_s_per_request": stages, "stages": timing.get("stages", []),
        "flower_share": round(flower / max(1e-9, sum(stages.values())), 3),
        "bytes_per_site_round": int((traffic["bytes_sent"] + traffic["bytes_received"]) / (sites * rounds)),
        "unregistered_refused": refused and dep["mean_test_auc"] == dep["mean_test_auc"], "tls": tls,
        "secure_aggregation": bool(timing.get("secure_aggregation")), "rounds": rounds, "sites": sites,
        "secagg_s_per_round": round(timing.get("secagg_s", 0.0) / rounds, 3),
        "secagg_setup_s": round(timing.get("secagg_setup_s", 0.0), 3),
        "secagg_share_of_round": round(timing.get("secagg_s", 0.0) / max(1e-9, sum(h["round_s"] for h in dep["history"])), 4),
        "bytes_to_site_per_round": int(traffic["bytes_sent"] / (sites * rounds)),
        "bytes_from_site_per_round": int(traffic["bytes_received"] / (sites * rounds)),
        "state_bytes": state_bytes,
        "to_site_ratio": round(traffic["bytes_sent"] / (sites * rounds) / state_bytes, 3),
        "from_site_ratio": round(traffic["bytes_received"] / (sites * rounds) / state_bytes, 3),
        "secagg_bytes_per_site_round": int(traffic["bytes_received"] / (sites * rounds)) if timing.get("secure_aggregation") else 0,
        "quantisation_max_abs_error": quantisation[0], "quantisation_bound": quantisation[1],
        "control_api_blocked_for_sites": control[0] in (403, 404) and control[1] == 200
        and (dep_dir / "summary.json").is_file(),
        "unapproved_run_refused": unapproved["refused"],
        "calibration": calibration[-1] if calibration else None,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
