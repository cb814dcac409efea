"""``hsl test``: a finished run's deployed model(s) scored on the sites of any data configuration.

A site is a node of the data module (and its external site, if it has one). Which model scores it:

- the run deployed one model (``model.ckpt``): that model;
- the run deployed a model per node (``nodes/<name>.ckpt``) and the site is one of those nodes,
  drawn exactly as in training (its row of the run's ``data.json`` equals the data module's): that
  node's model, so the run's own test sets give back ``summary.json``'s test AUCs;
- otherwise (a site that never trained): every node's model, each reported, and their mean.

Per site and model: the AUC with a 95 % bootstrap interval (torchmetrics ``BootStrapper``,
multinomial resampling of the site's images), and accuracy, sensitivity and specificity at the
model's threshold, chosen on the run's validation data when it was trained.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torchmetrics.classification import BinaryAUROC
from torchmetrics.wrappers import BootStrapper
from tqdm.auto import tqdm

from hsl_lightning.inference import checkpoints
from hsl_lightning.errors import HSLError
from hsl_lightning.metrics import NodeMetrics, predictions, summarize


def _sites(dm, split: str) -> list[tuple[str, object, dict | None]]:
    """(name, loader, data.json row) for every site of the data module."""
    dm.setup()
    rows = {r["name"]: r for r in dm.report()}
    sites = [(n.name, dm.eval_loader(i, split), rows.get(n.name)) for i, n in enumerate(dm.nodes)]
    if getattr(dm, "external_data", None) is not None:
        sites.append((dm.external.name, dm.external_loader(), None))
    return sites


def _models_for(site: str, row: dict | None, models: dict, trained: dict) -> list[str | None]:
    if None in models:
        return [None]
    if site in models and row is not None and trained.get(site) == row:
        return [site]
    return list(models)


def _metrics(logits: torch.Tensor, target: torch.Tensor, threshold: float, bootstraps: int, seed: int) -> dict:
    at = NodeMetrics(threshold=threshold)
    at.update(logits, target)
    out = {"n": len(target), "positives": int(target.sum()), **at.compute(), "threshold": threshold}
    out["auc_low"] = out["auc_high"] = math.nan
    if not math.isnan(out["auc"]) and bootstraps > 0:
        torch.manual_seed(seed)  # BootStrapper resamples with torch's global generator
        boot = BootStrapper(BinaryAUROC(), num_bootstraps=bootstraps, quantile=torch.tensor([0.025, 0.975]),
                            sampling_strategy="multinomial")
        with warnings.catch_warnings():  # a resample may miss a class; torchmetrics warns, its AUC counts as 0
            warnings.simplefilter("ignore", UserWarning)
            boot.update(torch.sigmoid(logits), target.long())
            low, high = boot.compute()["quantile"].tolist()
        out["auc_low"], out["auc_high"] = low, high
    return out


def score(run_dir: str | Path, dm, split: str = "test", bootstraps: int = 1000, seed: int = 0,
          progress: bool = True) -> dict:
    """Every site of ``dm`` scored with the run's deployed model(s); see the module docs."""
    if split not in ("val", "test"):
        raise HSLError(f"hsl test scores the val or test split, got '{split}'.")
    run_dir = Path(run_dir)
    models = checkpoints.deployed(run_dir)
    data_json = run_dir / "data.json"
    trained = {r["name"]: r for r in json.loads(data_json.read_text())} if data_json.is_file() else {}
    sites = _sites(dm, split)
    loaded = {}
    results = []
    bar = tqdm(total=sum(len(_models_for(n, row, models, trained)) for n, _, row in sites), desc="hsl test",
               unit="site-model", disable=not progress, dynamic_ncols=True)
    for name, loader, row in sites:
        scored = []
        for node in _models_for(name, row, models, trained):
            if node not in loaded:
                loaded[node] = checkpoints.load(models[node])
            module, meta = loaded[node]
            bar.set_postfix_str(f"{name} with {node or 'the model'}")
            logits, target = predictions(module, loader)
            scored.append({"model": node or "model", **_metrics(logits, target, meta["threshold"], bootstraps, seed)})
            bar.update(1)
        site = {"site": name, **scored[0]} if len(scored) == 1 else {
            "site": name, "n": scored[0]["n"], "positives": scored[0]["positives"], "model": "mean over node models",
            "auc": summarize([s["auc"] for s in scored])["mean"], "models": scored}
        results.append(site)
    bar.close()
    return {"run": str(run_dir), "split": split, "bootstraps": bootstraps, "sites": results,
            "mean_auc": summarize([s["auc"] for s in results])["mean"]}


def format_scores(result: dict) -> str:
    """The printed table of :func:`score`."""
    lines = [f"{'site':<14}{'model':<16}{'n':>6}{'AUC':>8}{'95 % interval':>18}{'acc':>7}{'sens':>7}{'spec':>7}"]
    for site in result["sites"]:
        for row in site.get("models", [site]):
            interval = (f"{row['auc_low']:.3f}-{row['auc_high']:.3f}" if not math.isnan(row.get("auc_low", math.nan))
                        else "-")
            lines.append(f"{site['site']:<14}{row['model']:<16}{row['n']:>6}{row['auc']:>8.4f}{interval:>18}"
                         f"{row['acc']:>7.3f}{row['sensitivity']:>7.3f}{row['specificity']:>7.3f}")
        if "models" in site:
            lines.append(f"{site['site']:<14}{'mean':<16}{site['n']:>6}{site['auc']:>8.4f}")
    lines.append(f"mean site AUC {result['mean_auc']:.4f} ({result['split']} split of {len(result['sites'])} site(s))")
    return "\n".join(lines)
