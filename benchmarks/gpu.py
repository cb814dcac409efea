"""How fast can one GPU simulate N institutions training their own models?

Training N models one after another with small batches at small images leaves a GPU waiting on
kernel launches. This script measures training throughput (images/s) for N institutions x batch B
(default 8 x 64 = 512 images per step, 28 px, 1 channel, fp32; ``--bf16`` for bf16 autocast):

    ceiling_eager      one model on the concatenated batch of N*B (the throughput to aim at)
    ceiling_graph      the same, whole train step (forward, backward, AdamW) in one CUDA graph
    sequential_eager   N models one after another, each with its own AdamW (FedAvg-style workload)
    sequential_graph   the same, one CUDA graph per institution
    fused_eager        the N models as one (hsl_lightning.federation.fused.FusedModels, torch.vmap)
    fused_graph        the same, whole fused step in one CUDA graph
                       (if capturing the optimizer fails: fused_graph_fwdbwd, optimizer outside)

first for the plain classifier (ClassifierModule), then for the HSL model (HSLModule: primary and
SAT encoder + MMoE; a step takes N*B primary and N*B SAT images, images/s counts the primary
ones). Every variant processes the same images per step; figures are the median of ``--repeats``
timed runs of ``--steps`` steps after ``--warmup`` steps, with the device synchronised before
each clock read. A quick check also compares fused with sequential training (parameters and
BatchNorm running statistics after two SGD steps).

    .venv/bin/python benchmarks/gpu.py                       # on a GPU machine, about 2-4 minutes
    .venv/bin/python benchmarks/gpu.py --device cpu --steps 3 --batch 8   # smoke check

Prints a table, writes benchmarks/results/gpu.json (after every variant, so a cut-off run keeps
what it measured) and ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsl_lightning.federation.fused import FusedModels  # noqa: E402
from hsl_lightning.modules import ClassifierModule, HSLModule  # noqa: E402

POOL = 4  # distinct batches cycled through (generated on the device beforehand)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--institutions", type=int, default=8)
    p.add_argument("--batch", type=int, default=64, help="batch per institution")
    p.add_argument("--size", type=int, default=28, help="image side in pixels")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (parameters and optimizer stay fp32)")
    p.add_argument("--no-hsl", action="store_true", help="skip the HSL model variants")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="start no further variant after this many seconds (the rest are reported as skipped)")
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.warmup = (10 if cuda else 1) if args.warmup is None else args.warmup
    args.repeats = (3 if cuda else 1) if args.repeats is None else args.repeats
    return args


# ----------------------------------------------------------------------------- helpers
class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.n, self.b = args.institutions, args.batch
        self.images_per_step = self.n * self.b

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self):
        if not self.args.bf16:
            return contextlib.nullcontext()
        # no autocast weight cache: cached casts do not survive CUDA graph capture
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def adamw(self, params, capturable=False):
        return torch.optim.AdamW(params, lr=self.args.lr, weight_decay=1e-4, foreach=True, capturable=capturable)

    def time_steps(self, step: Callable[[int], None]) -> dict:
        a = self.args
        for k in range(a.warmup):
            step(k)
        self.sync()
        rates = []
        for _ in range(a.repeats):
            self.sync()
            t0 = time.perf_counter()
            for k in range(a.steps):
                step(k)
            self.sync()
            rates.append(a.steps * self.images_per_step / (time.perf_counter() - t0))
        out = {"img_s": statistics.median(rates), "runs_img_s": rates}
        if self.cuda:
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def capture(self, fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
        """Warm ``fn`` up on a side stream, then capture one call of it in a CUDA graph."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        self.sync()
        return g


def _copy_into(static: dict, batch: dict) -> None:
    for k, v in batch.items():
        static[k].copy_(v)


def _flat(batch: dict) -> dict:
    """(N, B, ...) -> (N*B, ...): the institutions' batches concatenated."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def _loss(model, batch):
    return model.training_loss(batch)[0]


# ----------------------------------------------------------------------------- workloads
class Workload:
    """A model family and its batches: the classifier (FedAvg-style) or the HSL model."""

    def __init__(self, bench: Bench, kind: str):
        self.bench, self.kind = bench, kind
        a, dev = bench.args, bench.device
        g = torch.Generator(device="cpu").manual_seed(0)
        shape = (POOL, a.institutions, a.batch, 1, a.size, a.size)
        pool = {"image": torch.rand(shape, generator=g), "label": torch.randint(0, 2, shape[:3], generator=g)}
        if kind == "hsl":
            pool["sat_image"] = torch.rand(shape, generator=g)
            pool["sat_label"] = torch.randint(0, 2, shape[:3], generator=g)
        self.pool = [{k: v[i].to(dev) for k, v in pool.items()} for i in range(POOL)]  # each (N, B, ...)
        self.flat_pool = [_flat(b) for b in self.pool]

    def make(self):
        a = self.bench.args
        if self.kind == "hsl":
            m = HSLModule(backbone=a.backbone, in_chans=1)
        else:
            m = ClassifierModule(backbone=a.backbone, in_chans=1)
        return m.to(self.bench.device).train()

    def models(self):
        torch.manual_seed(0)
        return [self.make() for _ in range(self.bench.n)]

    # --- one train step for all N institutions, as a function of the batch index
    def ceiling(self, graph: bool):
        bench = self.bench
        torch.manual_seed(0)
        model = self.make()
        opt = bench.adamw(model.parameters(), capturable=graph)

        def step_on(batch):
            opt.zero_grad(set_to_none=True)
            with bench.autocast():
                loss = _loss(model, batch)
            loss.backward()
            opt.step()

        if not graph:
            return lambda k: step_on(self.flat_pool[k % POOL])
        static = {k: v.clone() for k, v in self.flat_pool[0].items()}
        g = bench.capture(lambda: step_on(static))

        def step(k):
            _copy_into(static, self.flat_pool[k % POOL])
            g.replay()
        return step

    def sequential(self, graph: bool):
        bench = self.bench
        models = self.models()
        opts = [bench.adamw(m.parameters(), capturable=graph) for m in models]

        def step_on(i, batch):
            opts[i].zero_grad(set_to_none=True)
            with bench.autocast():
                loss = _loss(models[i], batch)
            loss.backward()
            opts[i].step()

        if not graph:
            def step(k):
                batch = self.pool[k % POOL]
                for i in range(bench.n):
                    step_on(i, {key: v[i] for key, v in batch.items()})
            return step
        statics = [{key: v[i].clone() for key, v in self.pool[0].items()} for i in range(bench.n)]
        graphs = [bench.capture(lambda i=i: step_on(i, statics[i])) for i in range(bench.n)]

        def step(k):
            batch = self.pool[k % POOL]
            for i in range(bench.n):
                _copy_into(statics[i], {key: v[i] for key, v in batch.items()})
                graphs[i].replay()
        return step

    def fused(self, graph: bool, optimizer_in_graph: bool = True):
        bench = self.bench
        fused = FusedModels(self.models())
        opt = bench.adamw(fused.parameters(), capturable=graph and optimizer_in_graph)

        def step_on(batch, with_opt=True):
            o = opt if with_opt else None
            with bench.autocast():
                if self.kind == "hsl":
                    if o is not None:
                        o.zero_grad(set_to_none=True)
                    fused.map(_loss, batch).sum().backward()
                    if o is not None:
                        o.step()
                else:
                    fused.train_step(batch["image"], batch["label"], o)

        if not graph:
            return lambda k: step_on(self.pool[k % POOL])
        static = {k: v.clone() for k, v in self.pool[0].items()}
        if optimizer_in_graph:
            g = bench.capture(lambda: step_on(static))

            def step(k):
                _copy_into(static, self.pool[k % POOL])
                g.replay()
            return step
        # forward + backward captured; the optimizer (a few foreach kernels) runs eagerly on the
        # gradients the graph writes (allocated in the graph's pool at capture, same memory each replay)
        g = bench.capture(lambda: (opt.zero_grad(set_to_none=True), step_on(static, with_opt=False)))

        def step(k):
            _copy_into(static, self.pool[k % POOL])
            g.replay()
            opt.step()
        return step


def correctness_check(bench: Bench) -> dict:
    """Fused vs sequential training of the classifier: two SGD steps from the same weights on the same
    batches (fp32, TF32 off); the largest differences in parameters and in BatchNorm running statistics."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _correctness_check(bench)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _correctness_check(bench: Bench) -> dict:
    wl = Workload(bench, "classifier")
    models = wl.models()
    seq = [copy.deepcopy(m) for m in models]
    fused = FusedModels(models)
    opt = torch.optim.SGD(fused.parameters(), lr=0.01)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in seq]
    for k in range(2):
        batch = wl.pool[k]
        fused.train_step(batch["image"], batch["label"], opt)
        for i, m in enumerate(seq):
            opts[i].zero_grad(set_to_none=True)
            _loss(m, {key: v[i] for key, v in batch.items()}).backward()
            opts[i].step()
    sds = fused.state_dicts()
    pdiff = sdiff = 0.0
    for i, m in enumerate(seq):
        for name, t in m.state_dict().items():
            d = float((sds[i][name].double() - t.double()).abs().max())
            if "running" in name:
                sdiff = max(sdiff, d)
            elif t.is_floating_point():
                pdiff = max(pdiff, d)
    return {"max_param_diff": pdiff, "max_running_stat_diff": sdiff}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    bench = Bench(args)
    torch.backends.cudnn.benchmark = True
    cuda = bench.cuda
    name = torch.cuda.get_device_name(bench.device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(), "config": {k: v for k, v in vars(args).items() if k != "out"},
        "images_per_step": bench.images_per_step, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "variants": {}, "errors": {},
    }
    print(f"device {name}, torch {torch.__version__}; {args.institutions} institutions x batch {args.batch} "
          f"({bench.images_per_step} images/step), {args.size} px, {args.backbone}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; {args.warmup} warm-up + {args.repeats} x {args.steps} steps",
          flush=True)
    t_start = time.perf_counter()

    def save():
        result["wall_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(result, indent=2))

    def run(key: str, build: Callable[[], Callable[[int], None]]) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            result["errors"][key] = {"error": f"skipped: past --budget-s {args.budget_s:.0f} s"}
            print(f"  {key:<26} skipped (past --budget-s {args.budget_s:.0f} s)", flush=True)
            return False
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(bench.device)
        t0 = time.perf_counter()
        try:
            step = build()
            r = bench.time_steps(step)
            r["wall_s"] = time.perf_counter() - t0
            result["variants"][key] = r
            print(f"  {key:<26} {r['img_s']:>10,.0f} images/s   ({r['wall_s']:.1f} s)", flush=True)
            ok = True
        except Exception as exc:  # one failing variant must not cost the others
            msg = f"{type(exc).__name__}: {exc}"
            result["errors"][key] = {"error": msg[:2000], "traceback": traceback.format_exc()[-4000:]}
            print(f"  {key:<26} FAILED {msg[:500]}", flush=True)
            traceback.print_exc(limit=-3)
            ok = False
            with contextlib.suppress(Exception):
                bench.sync()
        step = None  # noqa: F841  (free the graphs before the next variant)
        save()
        return ok

    try:
        result["check"] = correctness_check(bench)
        print(f"  check: fused vs sequential after 2 SGD steps (fp32, no TF32): max |param diff| {result['check']['max_param_diff']:.2e},"
              f" max |running-stat diff| {result['check']['max_running_stat_diff']:.2e}", flush=True)
    except Exception as exc:
        result["errors"]["check"] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        print(f"  check FAILED {type(exc).__name__}: {exc}", flush=True)

    kinds = ["classifier"] if args.no_hsl else ["classifier", "hsl"]
    for kind in kinds:
        prefix = "" if kind == "classifier" else "hsl_"
        print(f"[{kind}]", flush=True)
        try:
            wl = Workload(bench, kind)
        except Exception as exc:
            result["errors"][prefix + "workload"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"  {kind}: could not build the workload: {exc}", flush=True)
            continue
        # eager variants first: a failed graph capture cannot then cost them
        run(prefix + "ceiling_eager", lambda: wl.ceiling(graph=False))
        run(prefix + "sequential_eager", lambda: wl.sequential(graph=False))
        run(prefix + "fused_eager", lambda: wl.fused(graph=False))
        if not cuda:
            print("  (CUDA graph variants skipped: they need a CUDA device)", flush=True)
            continue
        run(prefix + "ceiling_graph", lambda: wl.ceiling(graph=True))
        run(prefix + "sequential_graph", lambda: wl.sequential(graph=True))
        if not run(prefix + "fused_graph", lambda: wl.fused(graph=True)):
            print("  retrying with the optimizer outside the graph", flush=True)
            run(prefix + "fused_graph_fwdbwd", lambda: wl.fused(graph=True, optimizer_in_graph=False))
        del wl

    # ----- table
    v = result["variants"]

    def best_ceiling(prefix):
        c = [v[k]["img_s"] for k in (prefix + "ceiling_eager", prefix + "ceiling_graph") if k in v]
        return max(c) if c else None

    print()
    print(f"{'config':<28}{'images/s':>12}{'% of ceiling':>14}{'x seq. eager':>14}")
    for kind in kinds:
        prefix = "" if kind == "classifier" else "hsl_"
        ceil, base = best_ceiling(prefix), v.get(prefix + "sequential_eager", {}).get("img_s")
        for variant in ("ceiling_eager", "ceiling_graph", "sequential_eager", "sequential_graph", "fused_eager",
                        "fused_graph", "fused_graph_fwdbwd"):
            key = prefix + variant
            if key in v:
                r = v[key]
                r["pct_of_ceiling"] = 100 * r["img_s"] / ceil if ceil else None
                pct = f"{r['pct_of_ceiling']:.1f}" if ceil else "-"
                speed = f"{r['img_s'] / base:.2f}" if base else "-"
                print(f"{key:<28}{r['img_s']:>12,.0f}{pct:>14}{speed:>14}")
            elif key in result["errors"]:
                print(f"{key:<28}{'failed':>12}")
    if "hsl" in kinds:
        print("(hsl_*: images/s counts primary images; each step also takes as many SAT images)")
    if result["errors"]:
        print("failed: " + ", ".join(sorted(result["errors"])))

    # ----- headline
    def fig(key):
        return v[key]["img_s"] if key in v else None

    def best_fused(prefix):
        return next(((k, v[k]["img_s"]) for k in (prefix + "fused_graph", prefix + "fused_graph_fwdbwd") if k in v),
                    (None, None))

    headline = {"device": name, "bf16": args.bf16}
    for prefix in ("", "hsl_") if "hsl" in kinds else ("",):
        ceil = best_ceiling(prefix)
        fk, fv = best_fused(prefix)
        headline.update({
            f"{prefix}ceiling_img_s": ceil,
            f"{prefix}fused_graph_img_s": fv,
            f"{prefix}fused_graph_pct_of_ceiling": 100 * fv / ceil if fv and ceil else None,
            f"{prefix}fused_eager_img_s": fig(prefix + "fused_eager"),
            f"{prefix}sequential_eager_img_s": fig(prefix + "sequential_eager"),
            f"{prefix}sequential_graph_img_s": fig(prefix + "sequential_graph"),
        })
        if fk and fk.endswith("fwdbwd"):
            headline[f"{prefix}fused_graph_variant"] = "optimizer outside the graph"
    headline = {k: (round(x, 1) if isinstance(x, float) else x) for k, x in headline.items()}
    headline["failed"] = sorted(result["errors"])
    result["headline"] = headline
    save()
    print(f"wrote {out_path} ({result['wall_s']:.0f} s)")
    print("RESULT " + json.dumps(headline))
    return result


if __name__ == "__main__":
    main()
