"""What a run writes and shows: its folder, per-round rows, the progress bar, weights and the summary.

Rank 0 writes ``data.json`` (how each node was drawn), ``config.yaml`` (the resolved CLI config),
one metrics row per round (CSV always, W&B unless disabled), ``summary.json`` and the final
table, and ``model.ckpt`` when every node deploys the same model; otherwise every rank writes
``nodes/<name>.ckpt`` for the nodes it hosts (Lightning checkpoints: :mod:`hsl_lightning.inference.checkpoints`).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from hsl_lightning.data.base import ImageSet
from hsl_lightning.inference import checkpoints
from hsl_lightning.federation.evaluation import METRICS
from hsl_lightning.federation.loggers import make_loggers
from hsl_lightning.metrics import summarize, youden


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Reporter:
    """The run's outputs on this rank; ``state`` is the rank's starting state (restored rounds are
    logged again, into fresh logs)."""

    def __init__(self, federation, run, state):
        self.federation, self.run = federation, run
        self.rank0 = run.fabric.global_rank == 0
        self.loggers = self._open() if self.rank0 else []
        for row in state.history:
            self._log({k: v for k, v in row.items() if k not in ("round", "dropped")}, step=row["round"])
        rounds, trainees = federation.rounds, len(run.mine)
        self.bar = tqdm(total=rounds * trainees, initial=min(state.rounds_done, rounds) * trainees,
                        desc=run.strategy.name, unit="node-round", dynamic_ncols=True,
                        disable=not (federation.progress and self.rank0))

    def _open(self) -> list:
        fed, run_dir = self.federation, self.run.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "data.json", json.dumps(self.run.data_report, indent=2))
        if fed.run_config is not None:
            atomic_write(run_dir / "config.yaml", yaml.safe_dump(fed.run_config, sort_keys=False))
        config = {"federation": fed.describe(), **(fed.run_config or {})}
        return make_loggers(run_dir, fed.wandb, fed.wandb_project, run_dir.name, config)

    def statistics(self, rows: list[dict | None]) -> None:
        """The sites' statistics (rank 0): ``statistics.json`` (every site's row and their comparison), printed in
        the study's terms; ``summary.json`` takes the comparison and the fingerprints."""
        if not self.rank0:
            return
        from hsl_lightning.data.statistics import compare, format_comparison

        comparison = compare(rows)
        atomic_write(self.run.run_dir / "statistics.json", json.dumps({"sites": rows, "comparison": comparison},
                                                                      indent=2))
        if self.federation.progress:
            tqdm.write(format_comparison(rows, comparison))

    def _statistics_summary(self) -> dict | None:
        path = self.run.run_dir / "statistics.json"
        if not path.is_file():
            return None
        recorded = json.loads(path.read_text())
        return {"comparison": recorded["comparison"],
                "fingerprints": {row["name"]: row["fingerprint"] for row in recorded["sites"] if row}}

    def _log(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def round(self, r: int, total, validation, losses: torch.Tensor, seconds: float,
              update_norms: torch.Tensor | None = None) -> dict:
        """Record round ``r``: its row (traffic, validation metrics, training losses; with DP the
        nodes' update norms before clipping) into the history and the logs; a line under the
        progress bar when it was validated."""
        run = self.run
        dropped = [run.label(t) for t in range(len(run.plan)) if total.finished[t] == 0]
        traffic = int(total.traffic)
        # every trainee sends its state and receives the merge; SplitAVG's feature maps come on top
        row = {"round": r + 1, "bytes_sent_per_node": run.payload, "bytes_features_round": traffic,
               "bytes_round": 2 * run.payload * len(run.plan) + traffic, "nodes_dropped": len(dropped)}
        if validation is not None:
            stats = validation.stats
            row.update({"mean_val_auc": stats["mean"], "std_val_auc": stats["std"], "min_val_auc": stats["min"]})
            row.update(validation_totals(validation.metrics))
        for i, name in enumerate(run.names):
            if validation is not None:
                row.update({f"{name}/val_{m}": validation.metrics[i][m] for m in METRICS})
                if "loss" in validation.metrics[i]:
                    row[f"{name}/val_loss"] = validation.metrics[i]["loss"]
            row[f"{name}/train_loss"] = float(losses[i])
        row["round_s"] = round(seconds, 4)
        privacy = self.federation.privacy
        if privacy is not None:  # the privacy spent so far, from Opacus's accountant
            row["dp_epsilon"] = privacy.epsilon(r + 1)
            finished = update_norms[~update_norms.isnan()]
            if len(finished):  # to choose the clip C by: Opacus's advice is near the median norm
                row["dp_update_norm_median"] = float(finished.median())
                row["dp_update_norm_max"] = float(finished.max())
                row["dp_clipped_share"] = float((finished > privacy.clip).double().mean())
        self._log({k: v for k, v in row.items() if k != "round"}, step=r + 1)
        if self.rank0 and self.federation.progress and validation is not None:
            self.bar.write(f"round {r + 1}/{self.federation.rounds}: mean node val AUC {stats['mean']:.4f} "
                           f"(min {stats['min']:.4f}){'  * best so far' if validation.improved else ''}")
        return {**row, "dropped": dropped}

    def at_once(self) -> tuple[int, int]:
        """(institutions training at the same time, intra-op threads each) as summary.json reports
        them: rank 0's."""
        return self.run.at_once

    def finish(self, state, test: list[dict], external: list[dict], thresholds: torch.Tensor,
               start: float) -> dict | None:
        """Weight files (every rank its trainees'), then on rank 0: ``summary.json`` (``start``: the
        run's ``time.perf_counter()`` when it began), the final metrics, W&B's run closed, the table
        printed. Returns the summary (None on other ranks)."""
        node_thresholds = [youden(row) for row in thresholds]
        pooled = youden(thresholds.sum(0)) if self.one_model else None
        if self.federation.save_weights:
            self.write_checkpoints(state.best, node_thresholds, pooled)
        peaks = self._peak_rss()
        data_mb = self.data_mb()
        if not self.rank0:
            return None
        summary = self.summary(state, test, time.perf_counter() - start)
        for node, threshold in zip(summary["nodes"], node_thresholds):
            node["threshold"] = threshold
        summary["threshold"] = pooled
        summary["external"] = external
        privacy = self.federation.privacy
        if privacy is not None:
            summary["privacy"] = privacy.summary(len(state.history), len(self.run.plan))
        summary["peak_rss_mb_per_rank"] = [round(float(p), 1) for p in peaks]
        summary["data_mb_per_rank"] = [round(float(d), 2) for d in data_mb]
        summary["institutions_at_once"], summary["threads_per_institution"] = self.at_once()
        if self.federation.statistics is not None:
            summary["statistics"] = self._statistics_summary()
        atomic_write(self.run.run_dir / "summary.json", json.dumps(summary, indent=2))
        final = {f"{n['name']}/test_auc": n["test_auc"] for n in summary["nodes"]}
        final.update({"test/mean_auc": summary["mean_test_auc"], "test/std_auc": summary["std_test_auc"],
                      "test/min_auc": summary["min_test_auc"], "best_round": state.best.round + 1})
        final.update({f"external/{site['name']}_auc": site["auc"] for site in external})
        self._log(final, step=self.federation.rounds + 1)
        self._close(final)
        print(format_table(summary))
        return summary

    def _close(self, final: dict) -> None:
        for logger in self.loggers:
            logger.finalize("success")
        if any(type(lg).__name__ == "WandbLogger" for lg in self.loggers):
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update(final)
                wandb.finish()

    def _peak_rss(self) -> torch.Tensor:
        """Each rank's peak resident memory in MB (a collective on several ranks)."""
        fabric = self.run.fabric
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
        return fabric.all_gather(peak.to(fabric.device)).reshape(-1).cpu() if fabric.world_size > 1 else peak

    @property
    def one_model(self) -> bool:
        """Whether every node deploys the same model (one trainee, or one merged state and nothing local)."""
        run = self.run
        return len(run.plan) == 1 or (run.strategy.merge_kind.one_model and not run.local_keys
                                      and not run.strategy.personal_model)

    def data_mb(self) -> torch.Tensor:
        """MB of institution images each rank holds (only those of the nodes it hosts; a collective)."""
        fabric, held = self.run.fabric, 0
        for node in self.run.dm.nodes:
            for split in (node.train, node.val, node.test):
                if isinstance(split, ImageSet):
                    held += split.images.numel() * split.images.element_size()
        mb = torch.tensor([held / 2**20], dtype=torch.float64)
        return fabric.all_gather(mb.to(fabric.device)).reshape(-1).cpu() if fabric.world_size > 1 else mb

    def write_checkpoints(self, best, node_thresholds: list[float], pooled: float | None) -> None:
        """``model.ckpt`` (rank 0, with the threshold of all nodes' validation images pooled) when every
        node deploys the same model, else ``nodes/<name>.ckpt`` for each node this rank hosts (with its own)."""
        fed, run, run_dir = self.federation, self.run, self.run.run_dir
        info = {"round": best.round + 1, "strategy": run.strategy.name, "seed": fed.seed, "run": str(run_dir),
                "image_size": run.dm.size, "in_chans": run.dm.in_chans, "reader": run.dm.reading(), "nodes": list(run.names)}
        # torch.save inside, not fabric.save: the latter waits at a barrier that only some ranks would reach.
        if self.one_model:
            if self.rank0:
                best.trainees[run.mine[0]].load_deployed(run.module, run.packer, best.merged)
                checkpoints.write(run_dir / "model.ckpt", run.module,
                                  {**info, "node": None, "threshold": pooled})
            return
        for t in run.mine:
            best.trainees[t].load_deployed(run.module, run.packer, best.merged)
            for i in run.plan[t]:
                checkpoints.write(run_dir / "nodes" / f"{run.names[i]}.ckpt", run.module,
                                  {**info, "node": run.names[i], "threshold": node_thresholds[i]})

    def summary(self, state, test: list[dict], wall: float) -> dict:
        """``summary.json``: per node its sizes, validation AUC at the deployed round, test metrics
        and ``pool_test_auc`` (its deployed model on the whole test pool seen through its scanner);
        the means over nodes, the deployed round and the rule that chose it, the history."""
        fed, run, history = self.federation, self.run, state.history
        best_round = state.best.round
        best_val = history[best_round]
        nodes = []
        for i, name in enumerate(run.names):
            node = run.dm.nodes[i]
            row = {"name": name, "n_train": len(node.train), "n_val": len(node.val), "n_test": len(node.test),
                   "test_auc": test[i]["auc"], "val_auc": best_val[f"{name}/val_auc"]}
            row.update({f"test_{k}": test[i][k] for k in METRICS if k != "auc"})
            if "pool_auc" in test[i]:
                row["pool_test_auc"], row["n_pool_test"] = test[i]["pool_auc"], len(run.dm.test_pool)
            if math.isnan(test[i]["auc"]):
                pos, n = node.test.positives, len(node.test)
                row["test_auc_undefined"] = ("no test samples" if n == 0 else
                                             f"test set holds one class only ({pos} positive of {n})"
                                             if pos in (0, n) else "the deployed model's outputs are not finite")
            nodes.append(row)
        stats = summarize([n["test_auc"] for n in nodes])
        pool = summarize([n.get("pool_test_auc", math.nan) for n in nodes])
        return {
            "method": run.strategy.name, "seed": fed.seed, "rounds": fed.rounds,
            "local_epochs": fed.local_epochs, "best_round": best_round + 1, "rounds_run": len(history),
            "patience": fed.patience, "stopped_early": len(history) < fed.rounds, "wall_s": round(wall, 2),
            "nodes": nodes, "mean_test_auc": stats["mean"], "std_test_auc": stats["std"],
            "min_test_auc": stats["min"], "mean_pool_test_auc": pool["mean"], "min_pool_test_auc": pool["min"],
            "mean_val_auc": best_val["mean_val_auc"], "deploy_round": fed.deploy_round,
            "bytes_sent_per_node_per_round": run.payload,
            "bytes_features_per_round": max((h["bytes_features_round"] for h in history), default=0),
            "history": history,
        }


def validation_totals(metrics: list[dict]) -> dict:
    """A validated round's totals over nodes for choosing a deployed round: the summed validation
    loss, and the mean node AUC and summed loss on each fixed half of every validation set
    (:func:`~hsl_lightning.federation.evaluation.halves`); empty without those metrics."""
    if not metrics or "loss" not in metrics[0]:
        return {}
    return {"sum_val_loss": sum(m["loss"] for m in metrics), "sum_val_loss_a": sum(m["loss_a"] for m in metrics),
            "mean_val_auc_a": summarize([m["auc_a"] for m in metrics])["mean"],
            "mean_val_auc_b": summarize([m["auc_b"] for m in metrics])["mean"]}


def format_table(summary: dict) -> str:
    """The per-node result table printed at the end of a run."""
    lines = [f"{'node':<14}{'n_train':>8}{'n_val':>7}{'n_test':>7}{'val AUC':>9}{'test AUC':>10}"]
    for n in summary["nodes"]:
        lines.append(f"{n['name']:<14}{n['n_train']:>8}{n['n_val']:>7}{n['n_test']:>7}"
                     f"{n['val_auc']:>9.4f}{n['test_auc']:>10.4f}" + (f"  failed: {n['failed']}" if n.get("failed") else ""))
    for site in summary.get("external", []):
        lines.append(f"{site['name']:<14}{'-':>8}{'-':>7}{site['n']:>7}{'-':>9}{site['auc']:>10.4f}  (never trained)")
    stopped = (f" (early stop after {summary['rounds_run']} of {summary['rounds']} rounds)"
               if summary.get("stopped_early") else "")
    lines.append(f"{summary['method']}: mean test AUC {summary['mean_test_auc']:.4f} +- {summary['std_test_auc']:.4f} "
                 f"(min {summary['min_test_auc']:.4f}), best round {summary['best_round']}{stopped}, "
                 f"{summary['wall_s']:.1f} s")
    return "\n".join(lines)
