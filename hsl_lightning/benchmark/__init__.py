"""Benchmark grids: methods x scenarios x seeds, run resumably, summarised as CSV, report and plots."""

from hsl_lightning.benchmark.grid import Cell, Grid
from hsl_lightning.benchmark.report import write_report
from hsl_lightning.benchmark.runner import run_grid

__all__ = ["Cell", "Grid", "run_grid", "write_report"]
