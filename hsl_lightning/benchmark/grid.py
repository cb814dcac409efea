"""A benchmark grid: methods x scenarios (with optional sweeps) x seeds, read from YAML.

A grid file looks like::

    out: benchmarks/results/heterogeneity        # where runs, results.csv, report.md and plots go
    data: [configs/data/breast_pneumonia.yaml]   # configs every cell starts from
    settings: {federation.rounds: 10}            # dotted overrides for every cell
    seeds: [0, 1, 2, 3, 4]                       # each seed draws the data split and the training
    methods:
      hsl: configs/methods/hsl.yaml              # a config file ...
      hsl_no_sat:                                # ... or a config with overrides (ablations)
        config: configs/methods/hsl.yaml
        settings: {model.init_args.sat_weight: 0.0}
    scenarios:
      feature: configs/scenarios/feature.yaml
      label:
        config: configs/scenarios/label.yaml
        sweep:                                   # one gradient step per entry: label -> value
          key: data.scenario.prevalence
          steps: {"0.5/0.5": [0.5, 0.5], "0.1/0.9": [0.1, 0.9]}
    compare: {method: hsl, against: [fedavg, fedprox, central]}   # the report's verdicts

Every cell is one ``hsl fit`` of ``data + scenario + method`` configs followed by the settings
(grid, scenario, method, tuned values, sweep step, in that order) with ``seed_everything`` and
``data.seed`` set to the seed. Paths are relative to the working directory.

Tuning on validation data: a method entry may carry ``search``, a mapping of dotted settings to
lists of values; every combination is a candidate::

    tune: {seeds: [100, 101], steps: {label: "0.3/0.7"}}    # tuning seeds (never reported)
    methods:
      fedprox:
        config: configs/methods/fedprox.yaml
        search: {model.init_args.lr: [3.0e-4, 1.0e-3], federation.strategy_options.mu: [0.01, 0.1]}

For each such method and scenario, every candidate runs on the tuning seeds (at the sweep step
``tune.steps`` names, by default the middle one) and the candidate of best mean node validation
AUC, averaged over those seeds, is used for every reported cell of that scenario. The tuning
seeds must differ from ``seeds``, so no reported data split and no test AUC informs a choice.
(Each seed draws its splits from the same pool of images, so a tuning seed's validation images
may be a reported seed's test images; only validation AUCs are read, alike for every method.)

A pilot of deployed-round rules (``federation.deploy_round``), on seeds that are not reported::

    pilot: {seeds: [101, 102], rules: [best_auc, best_loss, last]}

runs every method and scenario with its tuned settings on the pilot seeds for the whole budget
(``deploy_round: last``, no early stopping), so that each rule's choice can be replayed from the
validation history; the rule chosen on validation data alone
(:func:`~hsl_lightning.benchmark.tuning.choose_rule`) then applies to every reported cell of every
method alike. A thread-count rerun of a sample of the reported cells::

    rerun: {threads: 2, every: 10}

reruns one reported cell in ``every`` (a different one for each seed, so the sample spreads over
methods and scenarios) with ``threads`` CPU threads, right after its seed's cells. A scenario may
name the ``methods`` it runs (default: all), e.g. a second dataset run with fewer methods.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from hsl_lightning.errors import HSLError, suggest

KEYS = ("out", "data", "settings", "seeds", "methods", "scenarios", "compare", "description", "tune", "pilot", "rerun")


@dataclass(frozen=True)
class Cell:
    """One ``hsl fit`` of a grid: a method on a scenario at one sweep step and seed, with the configs
    and the dotted settings the run starts from (turned into arguments by
    :func:`~hsl_lightning.benchmark.runner.cell_args`). A tuning cell carries its ``candidate``, a
    pilot or rerun cell its ``stage`` (a rerun cell also its ``threads``); a reported cell neither.
    ``key`` names the cell's folder under the grid's ``runs/``."""

    method: str
    scenario: str
    step: str  # the sweep step's label ("-" when the scenario has no sweep)
    step_index: int
    seed: int
    configs: tuple[str, ...]
    settings: tuple[tuple[str, object], ...]
    candidate: str = ""  # a tuning cell's candidate label (c0, c1, ...); "" for a reported cell
    stage: str = ""  # "pilot" or "rerun" for those cells; "" for tuning and reported cells
    threads: int | None = None  # a rerun cell's threads (None: the grid's)

    @property
    def key(self) -> str:
        """The cell's folder under ``runs/``: ``<method>/<scenario>/<step>/seed<seed>`` for a reported
        cell, under ``tune/`` (with the candidate), ``pilot/`` or ``rerun/threads<n>/`` for the others."""
        where = f"{self.method}/{self.scenario}/{_safe(self.step)}"
        if self.candidate:
            return f"tune/{where}/{self.candidate}/seed{self.seed}"
        if self.stage == "rerun":
            return f"rerun/threads{self.threads}/{where}/seed{self.seed}"
        if self.stage:
            return f"{self.stage}/{where}/seed{self.seed}"
        return f"{where}/seed{self.seed}"


def run_dir(out: Path, cell: Cell) -> Path:
    """Where a cell's run writes (``summary.json`` there marks it done)."""
    return out / "runs" / cell.key


def result(out: Path, cell: Cell) -> dict | None:
    """A finished cell's summary: ``summary.json``, else its compact ``record.json`` (the summary
    without the per-round history, kept in git so that another session can resume the grid);
    None when the cell has not finished."""
    directory = run_dir(out, cell)
    record = directory / "record.json"
    if (directory / "summary.json").is_file():
        summary = json.loads((directory / "summary.json").read_text())
        if "cpu" not in summary and record.is_file():  # the grid writes the cell's CPU into its record only
            summary["cpu"] = json.loads(record.read_text()).get("cpu", "")
        return summary
    return json.loads(record.read_text()) if record.is_file() else None


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(label))


def _entry(name: str, value, kind: str) -> dict:
    """A method or scenario entry: a config path, a list of them, or {config, settings, sweep}."""
    if isinstance(value, (str, list)):
        value = {"config": value}
    if not isinstance(value, dict) or "config" not in value:
        raise HSLError(f"Benchmark {kind} '{name}' needs a config file (a path, or a mapping with 'config').")
    unknown = set(value) - {"config", "settings", "sweep", "search", "methods"}
    if unknown or (kind == "method" and "methods" in value):
        raise HSLError(f"Benchmark {kind} '{name}' has unknown key(s) {', '.join(sorted(unknown or {'methods'}))}; "
                       "it takes config, settings, (scenarios) sweep and methods, (methods) search.")
    configs = [value["config"]] if isinstance(value["config"], str) else list(value["config"])
    sweep = value.get("sweep")
    if sweep is not None:
        if (kind != "scenario" or not isinstance(sweep, dict) or set(sweep) != {"key", "steps"}
                or not isinstance(sweep["steps"], dict) or not sweep["steps"]):
            raise HSLError(f"Benchmark {kind} '{name}': a sweep is a mapping with 'key' (a dotted setting) and "
                           "'steps' (label -> value), on scenarios only.")
    search = value.get("search") or {}
    if search and (kind != "method" or not isinstance(search, dict)
                   or not all(isinstance(v, list) and v for v in search.values())):
        raise HSLError(f"Benchmark {kind} '{name}': search is a mapping of dotted settings to non-empty lists of "
                       "values, on methods only.")
    methods = value.get("methods")
    if methods is not None and (not isinstance(methods, list) or not methods):
        raise HSLError(f"Benchmark scenario '{name}': methods is a non-empty list of the grid's method names.")
    return {"configs": configs, "settings": dict(value.get("settings") or {}), "sweep": sweep, "search": search,
            "methods": methods}


@dataclass
class Grid:
    """A benchmark grid as read from its YAML file (see the module's docstring) by :meth:`load`,
    which checks it: the methods, scenarios (with their sweeps), seeds and settings of every cell, the
    verdicts to draw (``compare``), the optional tuning, pilot and rerun stages, and ``out``, the
    folder that receives the runs, ``results.csv``, ``report.md`` and ``plots/``. Its methods list the
    cells of each stage (:meth:`tuning_cells`, :meth:`pilot_cells`, :meth:`cells`, :meth:`rerun_cells`)."""

    out: Path
    data: list[str]
    settings: dict
    seeds: list[int]
    methods: dict[str, dict]
    scenarios: dict[str, dict]
    compare: dict = field(default_factory=dict)
    description: str = ""
    tune: dict = field(default_factory=dict)
    pilot: dict = field(default_factory=dict)
    rerun: dict = field(default_factory=dict)
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path, out: str | None = None) -> "Grid":
        """The grid of the YAML file ``path``, its results folder ``out`` if given (else the file's
        ``out``, else ``benchmarks/results/<the file's stem>``); raises :class:`~hsl_lightning.errors.HSLError`
        saying what to fix for a missing file, invalid YAML, an unknown key, a config path that is not
        a file, or a tuning, pilot, rerun or compare entry that does not fit the grid."""
        path = Path(path)
        if not path.is_file():
            raise HSLError(f"Benchmark grid file not found: {path}.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise HSLError(f"Benchmark grid {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise HSLError(f"Benchmark grid {path} must be a mapping of keys ({', '.join(KEYS)}).")
        unknown = set(raw) - set(KEYS)
        if unknown:
            key = sorted(unknown)[0]
            raise HSLError(f"Benchmark grid {path} has unknown key '{key}'.{suggest(key, KEYS)} "
                           f"Keys: {', '.join(KEYS)}.")
        for key in ("methods", "scenarios"):
            if not raw.get(key):
                raise HSLError(f"Benchmark grid {path} lists no {key}.")
            if not isinstance(raw[key], dict):
                raise HSLError(f"Benchmark grid {path}: {key} must be a mapping of name -> config (or "
                               f"{{config, settings}}), got a {type(raw[key]).__name__}.")
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise HSLError(f"Benchmark grid {path}: seeds must be a list of integers, got {seeds!r}.")
        grid = cls(
            out=Path(out or raw.get("out") or f"benchmarks/results/{path.stem}"),
            data=[raw["data"]] if isinstance(raw.get("data"), str) else list(raw.get("data") or []),
            settings=dict(raw.get("settings") or {}),
            seeds=seeds,
            methods={str(k): _entry(str(k), v, "method") for k, v in raw["methods"].items()},
            scenarios={str(k): _entry(str(k), v, "scenario") for k, v in raw["scenarios"].items()},
            compare=dict(raw.get("compare") or {}),
            description=str(raw.get("description") or ""),
            tune=dict(raw.get("tune") or {}),
            pilot=dict(raw.get("pilot") or {}),
            rerun=dict(raw.get("rerun") or {}),
            source=path,
        )
        grid._check_files()
        grid._check_tuning()
        grid._check_pilot_and_rerun()
        return grid

    def _check_pilot_and_rerun(self) -> None:
        from hsl_lightning.federation.state import DEPLOY_ROUNDS

        for scenario, entry in self.scenarios.items():
            for method in entry["methods"] or []:
                if method not in self.methods:
                    raise HSLError(f"Benchmark grid {self.source}: scenario '{scenario}' names method '{method}', which "
                                   f"is not among the methods.{suggest(str(method), list(self.methods))}")
        if self.pilot:
            unknown = set(self.pilot) - {"seeds", "rules", "scenarios"}
            seeds, rules = self.pilot.get("seeds") or [], self.pilot.get("rules") or []
            if unknown or not seeds or not all(isinstance(s, int) for s in seeds) or not rules:
                raise HSLError(f"Benchmark grid {self.source}: pilot takes seeds (a list of integers) and rules (a list "
                               f"of deploy_round rules: {', '.join(DEPLOY_ROUNDS)}).")
            bad = [r for r in rules if r not in DEPLOY_ROUNDS] + [s for s in self.pilot.get("scenarios") or []
                                                                   if s not in self.scenarios]
            if bad:
                raise HSLError(f"Benchmark grid {self.source}: pilot names {bad}, which are neither deploy_round rules "
                               f"({', '.join(DEPLOY_ROUNDS)}) nor, under scenarios, the grid's scenarios.")
            shared = sorted(set(seeds) & set(self.seeds))
            if shared:
                raise HSLError(f"Benchmark grid {self.source}: seed(s) {shared} are both pilot and reported seeds; the "
                               "rule must be chosen on seeds that are not reported. Use other pilot.seeds.")
        if self.rerun:
            threads, every = self.rerun.get("threads"), self.rerun.get("every", 10)
            if set(self.rerun) - {"threads", "every"} or not isinstance(threads, int) or threads < 1 \
                    or not isinstance(every, int) or every < 1:
                raise HSLError(f"Benchmark grid {self.source}: rerun takes threads (a positive integer, the thread "
                               "count of the rerun) and every (rerun one reported cell in every; default 10).")

    def _check_tuning(self) -> None:
        searched = [m for m, e in self.methods.items() if e["search"]]
        unknown = set(self.tune) - {"seeds", "steps"}
        if unknown:
            raise HSLError(f"Benchmark grid {self.source}: tune has unknown key(s) {', '.join(sorted(unknown))}; "
                           "it takes seeds and steps.")
        seeds = self.tune.get("seeds") or []
        if searched and not seeds:
            raise HSLError(f"Benchmark grid {self.source}: method(s) {', '.join(searched)} have a search, so the grid "
                           "needs tune: {seeds: [...]}, tuning seeds apart from the reported ones.")
        if not all(isinstance(s, int) for s in seeds):
            raise HSLError(f"Benchmark grid {self.source}: tune.seeds must be integers, got {seeds!r}.")
        shared = sorted(set(seeds) & set(self.seeds))
        if shared:
            raise HSLError(f"Benchmark grid {self.source}: seed(s) {shared} are both tuning and reported seeds; a "
                           "setting chosen on a seed must not be reported on it. Use other tune.seeds.")
        for scenario, label in (self.tune.get("steps") or {}).items():
            if scenario not in self.scenarios:
                raise HSLError(f"Benchmark grid {self.source}: tune.steps names scenario '{scenario}', which is not "
                               f"among the scenarios.{suggest(str(scenario), list(self.scenarios))}")
            labels = [k for k, _ in self.steps(scenario)]
            if str(label) not in labels:
                raise HSLError(f"Benchmark grid {self.source}: tune.steps gives '{label}' for scenario '{scenario}'; "
                               f"its steps are {', '.join(labels)}.")

    def _check_files(self) -> None:
        named = [("data", f) for f in self.data]
        named += [(f"method '{m}'", f) for m, e in self.methods.items() for f in e["configs"]]
        named += [(f"scenario '{s}'", f) for s, e in self.scenarios.items() for f in e["configs"]]
        for what, file in named:
            if not Path(file).is_file():
                raise HSLError(f"Benchmark grid {self.source}: the config of {what} is not a file: {file}.")
        if self.compare:
            names = [self.compare.get("method"), *self.compare.get("against", [])]
            for name in names:
                if name not in self.methods:
                    raise HSLError(f"Benchmark grid {self.source}: compare names '{name}', which is not among the "
                                   f"methods.{suggest(str(name), list(self.methods))}")

    def steps(self, scenario: str) -> list[tuple[str, object]]:
        sweep = self.scenarios[scenario]["sweep"]
        return [("-", None)] if sweep is None else [(str(k), v) for k, v in sweep["steps"].items()]

    def candidates(self, method: str) -> list[tuple[str, dict]]:
        """A searched method's candidates, (label, settings): every combination of its search values."""
        search = self.methods[method]["search"]
        combos = [dict(zip(search, values)) for values in itertools.product(*search.values())]
        return [(f"c{i}", combo) for i, combo in enumerate(combos)]

    def tune_step(self, scenario: str) -> tuple[int, str, object]:
        """(index, label, value) of the sweep step a scenario is tuned at (its only step if unswept)."""
        steps = self.steps(scenario)
        label = (self.tune.get("steps") or {}).get(scenario)
        index = [k for k, _ in steps].index(str(label)) if label is not None else (len(steps) - 1) // 2
        return index, steps[index][0], steps[index][1]

    def _cell(self, method: str, scenario: str, index: int, label: str, value, seed: int, extra: dict,
              candidate: str = "") -> Cell:
        s, m = self.scenarios[scenario], self.methods[method]
        settings = {**self.settings, **s["settings"], **m["settings"], **extra}
        if s["sweep"] is not None:
            settings[s["sweep"]["key"]] = value
        return Cell(method, scenario, label, index, seed, tuple(self.data + s["configs"] + m["configs"]),
                    tuple(settings.items()), candidate)

    def runs(self, method: str, scenario: str) -> bool:
        """Whether the scenario runs the method (a scenario may name its ``methods``)."""
        return self.scenarios[scenario]["methods"] is None or method in self.scenarios[scenario]["methods"]

    def tuning_cells(self) -> list[Cell]:
        """Every candidate of every searched method, per scenario (at its tuning step) and tuning seed."""
        out = []
        for seed in self.tune.get("seeds") or []:
            for scenario in self.scenarios:
                index, label, value = self.tune_step(scenario)
                for method in self.methods:
                    if self.methods[method]["search"] and self.runs(method, scenario):
                        out += [self._cell(method, scenario, index, label, value, seed, combo, candidate)
                                for candidate, combo in self.candidates(method)]
        return out

    def cells(self, chosen: dict[tuple[str, str], dict] | None = None) -> list[Cell]:
        """Every reported cell, seed by seed (a partly run grid holds whole seeds). ``chosen``:
        (method, scenario) -> the tuned settings (see :func:`~hsl_lightning.benchmark.tuning.choose`);
        a searched method's cells need them."""
        out = []
        for seed in self.seeds:
            out += self._seed_cells(seed, chosen)
        return out

    def _seed_cells(self, seed: int, chosen: dict | None, stage: str = "") -> list[Cell]:
        out = []
        for scenario in self.scenarios:
            for index, (label, value) in enumerate(self.steps(scenario)):
                for method in self.methods:
                    if self.runs(method, scenario):
                        extra = (chosen or {}).get((method, scenario), {})
                        cell = self._cell(method, scenario, index, label, value, seed, extra)
                        out.append(replace(cell, stage=stage) if stage else cell)
        return out

    def pilot_scenarios(self) -> list[str]:
        """The scenarios whose pilot cells choose the rule (``pilot.scenarios``, default all)."""
        return list(self.pilot.get("scenarios") or self.scenarios)

    def pilot_cells(self, chosen: dict | None = None, every_scenario: bool = False) -> list[Cell]:
        """Every method and scenario (of ``pilot.scenarios`` unless ``every_scenario``) with its tuned
        settings (``chosen``) on every pilot seed, run for the whole budget and deploying the last
        round, so that every rule can be replayed from the validation history
        (:func:`~hsl_lightning.benchmark.tuning.choose_rule`). ``every_scenario``: also the other
        scenarios, whose curves set the number of rounds when the rule chosen is ``last``."""
        whole = {"federation.deploy_round": "last", "federation.patience": None}
        scenarios = set(self.scenarios if every_scenario else self.pilot_scenarios())
        out = []
        for seed in self.pilot.get("seeds") or []:
            out += [replace(c, settings=tuple({**dict(c.settings), **whole}.items()))
                    for c in self._seed_cells(seed, chosen, "pilot") if c.scenario in scenarios]
        return out

    def pilot_cells_elsewhere(self, chosen: dict | None = None) -> list[Cell]:
        """The pilot cells of the scenarios outside ``pilot.scenarios``: they run only when the rule
        chosen is ``last``, whose curves then set those scenarios' numbers of rounds."""
        piloted = set(self.pilot_scenarios())
        return [c for c in self.pilot_cells(chosen, every_scenario=True) if c.scenario not in piloted]

    def rerun_cells(self, cells: list[Cell]) -> list[Cell]:
        """The thread-count rerun of ``cells`` (reported cells): per seed, one cell in ``every``,
        starting at an offset that moves with the seed, so the sample covers methods and scenarios."""
        if not self.rerun:
            return []
        every, out = self.rerun.get("every", 10), []
        for k, seed in enumerate(self.seeds):
            mine = [c for c in cells if c.seed == seed]
            out += [replace(c, stage="rerun", threads=self.rerun["threads"])
                    for j, c in enumerate(mine) if (j + k) % every == 0]
        return out

    def ordered(self, cells: list[Cell]) -> list[Cell]:
        """Reported cells seed by seed, each seed's rerun sample right after it: a grid stopped part
        way holds whole seeds of every method, reruns included."""
        reruns = self.rerun_cells(cells)
        out = []
        for seed in self.seeds:
            out += [c for c in cells if c.seed == seed] + [c for c in reruns if c.seed == seed]
        return out
