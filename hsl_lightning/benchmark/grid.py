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
(grid, scenario, method, sweep step, in that order) with ``seed_everything`` and ``data.seed``
set to the seed. Paths are relative to the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hsl_lightning.errors import HSLError, suggest

KEYS = ("out", "data", "settings", "seeds", "methods", "scenarios", "compare", "description")


@dataclass(frozen=True)
class Cell:
    method: str
    scenario: str
    step: str  # the sweep step's label ("-" when the scenario has no sweep)
    step_index: int
    seed: int
    configs: tuple[str, ...]
    settings: tuple[tuple[str, object], ...]

    @property
    def key(self) -> str:
        return f"{self.method}/{self.scenario}/{_safe(self.step)}/seed{self.seed}"


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(label))


def _entry(name: str, value, kind: str) -> dict:
    """A method or scenario entry: a config path, a list of them, or {config, settings, sweep}."""
    if isinstance(value, (str, list)):
        value = {"config": value}
    if not isinstance(value, dict) or "config" not in value:
        raise HSLError(f"Benchmark {kind} '{name}' needs a config file (a path, or a mapping with 'config').")
    unknown = set(value) - {"config", "settings", "sweep"}
    if unknown:
        raise HSLError(f"Benchmark {kind} '{name}' has unknown key(s) {', '.join(sorted(unknown))}; "
                       "it takes config, settings and (scenarios) sweep.")
    configs = [value["config"]] if isinstance(value["config"], str) else list(value["config"])
    sweep = value.get("sweep")
    if sweep is not None:
        if (kind != "scenario" or not isinstance(sweep, dict) or set(sweep) != {"key", "steps"}
                or not isinstance(sweep["steps"], dict) or not sweep["steps"]):
            raise HSLError(f"Benchmark {kind} '{name}': a sweep is a mapping with 'key' (a dotted setting) and "
                           "'steps' (label -> value), on scenarios only.")
    return {"configs": configs, "settings": dict(value.get("settings") or {}), "sweep": sweep}


@dataclass
class Grid:
    out: Path
    data: list[str]
    settings: dict
    seeds: list[int]
    methods: dict[str, dict]
    scenarios: dict[str, dict]
    compare: dict = field(default_factory=dict)
    description: str = ""
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path, out: str | None = None) -> "Grid":
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
            source=path,
        )
        grid._check_files()
        return grid

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

    def cells(self) -> list[Cell]:
        """Every cell, seed by seed (a partly run grid holds whole seeds)."""
        out = []
        for seed in self.seeds:
            for scenario, s in self.scenarios.items():
                for index, (label, value) in enumerate(self.steps(scenario)):
                    for method, m in self.methods.items():
                        settings = {**self.settings, **s["settings"], **m["settings"]}
                        if s["sweep"] is not None:
                            settings[s["sweep"]["key"]] = value
                        out.append(Cell(method, scenario, label, index, seed,
                                        tuple(self.data + s["configs"] + m["configs"]),
                                        tuple(settings.items())))
        return out
