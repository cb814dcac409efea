"""Two finished runs side by side (``hsl compare RUN_A RUN_B``): the check that a deployment on
Flower gave the numbers of its simulation (``hsl fit``), bit for bit.

A run directory holds ``summary.json`` and its deployed weights: ``model.ckpt`` (one model for every
node) or ``nodes/<name>.ckpt``. A deployment's per-node models stay at their sites, at the paths in
``summary.json``'s ``deployment.site_checkpoints``; a copy of one kept elsewhere is named with
``--weights NAME=PATH`` (for RUN_B; ``--weights-a`` for RUN_A). A node's checkpoint is, in this
order: the one named on the command line, the site-held one, ``nodes/<name>.ckpt``, ``model.ckpt``.

The comparison reports, per model (one when both runs deploy one model, else one per node), the
largest absolute weight difference in each **tensor group** (a state-dict key without its last
component, cut to at most two components: ``primary_encoder.layer1.0.conv1.weight`` is in
``primary_encoder.layer1``, ``head.weight`` in ``head``) and over all tensors, differences taken in
float64; and each node's validation and test AUC in both runs with their difference (B - A). The
runs are **identical** when every tensor is equal bit for bit (NaN where the other has NaN), every
AUC is equal and the deployed round is the same. Different nodes, tensor names, shapes or dtypes
are an :class:`~hsl_lightning.errors.HSLError`, as are a missing directory, ``summary.json`` or
checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from hsl_lightning.errors import HSLError, suggest

__all__ = ["compare_runs", "format_comparison", "group_of", "node_checkpoints", "parse_weights", "read_summary",
           "tensor_diff"]


def read_summary(run_dir: str | Path) -> dict:
    """The run's ``summary.json`` (an HSLError when the directory or the file is missing)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HSLError(f"Run directory not found: {run_dir}.")
    path = run_dir / "summary.json"
    if not path.is_file():
        raise HSLError(f"{path} not found: hsl compare takes run directories of hsl fit or of a deployment "
                       "(each holds summary.json), and the run must have finished.")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise HSLError(f"{path} is not valid JSON: {exc}.") from exc


def parse_weights(items: list[str] | None) -> dict[str, Path]:
    """``["NAME=PATH", ...]`` (the ``--weights`` options) as ``{NAME: PATH}``."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise HSLError(f"--weights takes NAME=PATH (a node's name and its checkpoint), not '{item}'.")
        out[name] = Path(path)
    return out


def _node_path(run_dir: Path, name: str, held: dict, given: dict[str, Path]) -> Path:
    """Where node ``name``'s deployed checkpoint is: see the module's docstring for the order."""
    if name in given:
        tried = [given[name]]
    else:
        tried = [Path(held[name])] if name in held else []
        tried += [run_dir / "nodes" / f"{name}.ckpt", run_dir / "model.ckpt"]
    for path in tried:
        if path.is_file():
            return path
    raise HSLError(f"Checkpoint of node '{name}' of {run_dir} not found: looked for {', '.join(map(str, tried))}. "
                   f"If the site keeps it, copy it here and name it with --weights {name}=PATH.")


def node_checkpoints(run_dir: str | Path, summary: dict, given: dict[str, Path] | None = None) -> dict[str, Path]:
    """Every node's deployed checkpoint, ``{node name: path}`` (the same path for all nodes when the run
    deployed one model); ``given`` names checkpoints kept elsewhere, ``{node name: path}``."""
    run_dir, given = Path(run_dir), given or {}
    names = [node["name"] for node in summary.get("nodes", [])]
    for name in given:
        if name not in names:
            raise HSLError(f"--weights names node '{name}', which {run_dir} does not have.{suggest(name, names)} "
                           f"Its nodes: {', '.join(names)}.")
    held = summary.get("deployment", {}).get("site_checkpoints", {}) or {}
    return {name: _node_path(run_dir, name, held, given) for name in names}


def _load(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's ``state_dict`` (an HSLError when it cannot be read or has none)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise HSLError(f"Cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise HSLError(f"{path} is not a Lightning checkpoint (it has no 'state_dict').")
    return payload["state_dict"]


def group_of(key: str) -> str:
    """A state-dict key's tensor group: the key without its last component, cut to at most two
    components (``primary_encoder.layer1.0.conv1.weight`` -> ``primary_encoder.layer1``, ``head.weight``
    -> ``head``; a key of one component is its own group)."""
    parts = key.split(".")
    return ".".join(parts[:max(1, min(2, len(parts) - 1))])


def tensor_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``|a - b|``, in float64: 0 exactly when the tensors are equal element for element
    (NaN where the other has NaN counts as equal); infinite where only one is NaN."""
    a, b = a.detach().double(), b.detach().double()
    if not a.numel():
        return 0.0
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return float(diff.nan_to_num(nan=math.inf).max())


def _check_same_tensors(a: dict, b: dict, path_a: Path, path_b: Path) -> None:
    """An HSLError naming the first tensor that only one checkpoint has, or whose shape or dtype differs."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise HSLError(f"{path_a} and {path_b} hold different tensors: only in the first: "
                       f"{', '.join(only_a[:5]) or 'none'}{' ...' if len(only_a) > 5 else ''}; only in the second: "
                       f"{', '.join(only_b[:5]) or 'none'}{' ...' if len(only_b) > 5 else ''}. The runs trained "
                       "different models.")
    for key in a:
        if a[key].shape != b[key].shape or a[key].dtype != b[key].dtype:
            raise HSLError(f"Tensor '{key}' differs in shape or dtype: {tuple(a[key].shape)} {a[key].dtype} in "
                           f"{path_a}, {tuple(b[key].shape)} {b[key].dtype} in {path_b}. The runs trained "
                           "different models.")


def _compare_model(nodes: list[str], path_a: Path, path_b: Path, cache: dict) -> dict:
    """One model of each run: the largest |dw| per tensor group and over all, and how many tensors differ."""
    for path in (path_a, path_b):
        if path not in cache:
            cache[path] = _load(path)
    a, b = cache[path_a], cache[path_b]
    _check_same_tensors(a, b, path_a, path_b)
    groups: dict[str, float] = {}
    differ = 0
    for key in a:
        diff = tensor_diff(a[key], b[key])
        groups[group_of(key)] = max(groups.get(group_of(key), 0.0), diff)
        differ += diff != 0.0
    return {"nodes": nodes, "a": str(path_a), "b": str(path_b), "groups": groups,
            "max_abs_diff": max(groups.values(), default=0.0), "tensors": len(a), "differing_tensors": differ}


def _compare_weights(paths_a: dict[str, Path], paths_b: dict[str, Path]) -> list[dict]:
    """One entry per model: a single one when both runs deployed one model, else one per node."""
    cache: dict = {}
    if len(set(paths_a.values())) == 1 and len(set(paths_b.values())) == 1:
        return [_compare_model(list(paths_a), next(iter(paths_a.values())), next(iter(paths_b.values())), cache)]
    return [_compare_model([name], paths_a[name], paths_b[name], cache) for name in paths_a]


def _auc(node: dict, key: str) -> float:
    value = node.get(key)
    return math.nan if value is None else float(value)


def _auc_rows(summary_a: dict, summary_b: dict) -> list[dict]:
    """Per node and split: both runs' AUC, the difference B - A and whether they are equal."""
    b_nodes = {n["name"]: n for n in summary_b["nodes"]}
    rows = []
    for node in summary_a["nodes"]:
        row = {"node": node["name"]}
        for key in ("val_auc", "test_auc"):
            a, b = _auc(node, key), _auc(b_nodes[node["name"]], key)
            row[key] = {"a": a, "b": b, "diff": b - a, "equal": a == b or (math.isnan(a) and math.isnan(b))}
        rows.append(row)
    return rows


def _check_same_nodes(summary_a: dict, summary_b: dict, run_a: Path, run_b: Path) -> None:
    names_a = [n["name"] for n in summary_a.get("nodes", [])]
    names_b = [n["name"] for n in summary_b.get("nodes", [])]
    if sorted(names_a) != sorted(names_b) or not names_a:
        raise HSLError(f"The runs have different nodes: {run_a} has {', '.join(names_a) or 'none'}, {run_b} has "
                       f"{', '.join(names_b) or 'none'}. hsl compare compares runs of the same federation.")


def _verdict(models: list[dict], aucs: list[dict], rounds: list) -> str:
    """One line: identical, or the largest weight and AUC differences."""
    unequal = [(abs(r[k]["diff"]), r["node"], k) for r in aucs for k in ("val_auc", "test_auc") if not r[k]["equal"]]
    worst = max(models, key=lambda m: m["max_abs_diff"])
    if worst["max_abs_diff"] == 0.0 and not unequal and rounds[0] == rounds[1]:
        return (f"identical: {sum(m['tensors'] for m in models)} tensors in {len(models)} model(s) equal bit for bit, "
                f"{2 * len(aucs)} AUCs equal, best round {rounds[0]}")
    parts = ["differ"]
    if worst["max_abs_diff"]:
        group = max(worst["groups"], key=worst["groups"].get)
        parts.append(f"largest |dw| {_num(worst['max_abs_diff'])} ({_label(worst)}, {group})")
    if unequal:
        diff, node, key = max(unequal, key=lambda u: math.inf if math.isnan(u[0]) else u[0])
        parts.append(f"largest |dAUC| {_num(diff)} ({node} {key.replace('_auc', '')})")
    if rounds[0] != rounds[1]:
        parts.append(f"best round {rounds[0]} vs {rounds[1]}")
    return parts[0] + ": " + "; ".join(parts[1:])


def compare_runs(run_a: str | Path, run_b: str | Path, weights_a: dict[str, Path] | None = None,
                 weights_b: dict[str, Path] | None = None) -> dict:
    """Compare two runs' deployed weights and AUCs; ``weights_a``/``weights_b`` name checkpoints kept
    elsewhere, ``{node name: path}``. Returns a JSON-ready dict: ``identical``, ``verdict``, ``models``
    (per model: ``nodes``, the paths ``a`` and ``b``, ``groups`` {group: max |dw|}, ``max_abs_diff``,
    ``tensors``, ``differing_tensors``), ``aucs`` (per node: ``val_auc`` and ``test_auc``, each with
    ``a``, ``b``, ``diff`` = B - A, ``equal``), ``best_round`` [A, B] and ``max_abs_diff``."""
    run_a, run_b = Path(run_a), Path(run_b)
    summary_a, summary_b = read_summary(run_a), read_summary(run_b)
    _check_same_nodes(summary_a, summary_b, run_a, run_b)
    models = _compare_weights(node_checkpoints(run_a, summary_a, weights_a),
                              node_checkpoints(run_b, summary_b, weights_b))
    aucs = _auc_rows(summary_a, summary_b)
    rounds = [summary_a.get("best_round"), summary_b.get("best_round")]
    verdict = _verdict(models, aucs, rounds)
    return {"run_a": str(run_a), "run_b": str(run_b), "identical": verdict.startswith("identical"),
            "verdict": verdict, "best_round": rounds, "max_abs_diff": max(m["max_abs_diff"] for m in models),
            "models": models, "aucs": aucs}


def _num(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}"


def _label(model: dict) -> str:
    return model["nodes"][0] if len(model["nodes"]) == 1 else "one model, all nodes"


def _format_model(model: dict) -> list[str]:
    width = max(map(len, model["groups"]), default=0) + 2
    lines = [f"  {_label(model)}: {model['a']}  vs  {model['b']}"]
    lines += [f"    {group:<{width}}{_num(diff)}" for group, diff in model["groups"].items()]
    lines.append(f"    {'overall':<{width}}{_num(model['max_abs_diff'])}  ({model['differing_tensors']} of "
                 f"{model['tensors']} tensors differ)")
    return lines


def _format_aucs(aucs: list[dict]) -> list[str]:
    width = max(len(r["node"]) for r in aucs) + 2
    lines = [f"  {'node':<{width}}{'val A':>9}{'val B':>9}{'diff':>11}{'test A':>10}{'test B':>9}{'diff':>11}"]
    for r in aucs:
        v, t = r["val_auc"], r["test_auc"]
        lines.append(f"  {r['node']:<{width}}{v['a']:>9.4f}{v['b']:>9.4f}{_num(v['diff']):>11}"
                     f"{t['a']:>10.4f}{t['b']:>9.4f}{_num(t['diff']):>11}")
    return lines


def format_comparison(result: dict) -> str:
    """The report ``hsl compare`` prints: max |dw| per tensor group per model, the AUCs side by side,
    and the verdict line last."""
    lines = [f"A: {result['run_a']} (best round {result['best_round'][0]})",
             f"B: {result['run_b']} (best round {result['best_round'][1]})", "",
             "weights, max |dw| per tensor group (float64):"]
    for model in result["models"]:
        lines += _format_model(model)
    lines += ["", "AUCs (diff = B - A):", *_format_aucs(result["aucs"]), "", f"verdict: {result['verdict']}"]
    return "\n".join(lines)
