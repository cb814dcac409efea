"""MkDocs hook: serve the heterogeneity study's plots from where the study wrote them.

The plots live in ``benchmarks/results/heterogeneity/plots/`` next to the study's report; copying
them into ``docs/`` would leave two versions to drift apart. They are added to the site as
``study/plots/<name>.png``, so ``docs/study.md`` links them like any page's image.
"""

from pathlib import Path

from mkdocs.structure.files import File

PLOTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "heterogeneity" / "plots"


def on_files(files, config):
    """Add every study plot to the site's files."""
    for path in sorted(PLOTS.glob("*.png")):
        files.append(File.generated(config, f"study/plots/{path.name}", abs_src_path=str(path)))
    return files
