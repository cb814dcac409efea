"""The documentation site (mkdocs.yml, docs/) builds in strict mode, so a broken link, a page left out
of the navigation or a docstring that names an argument the signature lacks fails the suite; and the
pages that are generated from the code cover it: every configuration key, every strategy and its
options."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hsl_lightning
from hsl_lightning.federation.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: the classes whose documentation the configuration page renders as its key tables
from hsl_lightning.data.statistics import SiteStatistics  # noqa: E402

CONFIGURED = [hsl_lightning.Federation, hsl_lightning.DifferentialPrivacy, SiteStatistics, hsl_lightning.FederatedDataModule,
              hsl_lightning.Scenario, hsl_lightning.ExternalSite, hsl_lightning.SyntheticLesions,
              hsl_lightning.SyntheticAnchor, hsl_lightning.MedMNIST, hsl_lightning.ImageFolders,
              hsl_lightning.DicomFolders,
              hsl_lightning.HSLModule, hsl_lightning.ClassifierModule, hsl_lightning.SplitClassifier,
              hsl_lightning.FoundationProbe]


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


@pytest.mark.slow
def test_the_site_builds_in_strict_mode(tmp_path):
    out = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for page in nav_pages(mkdocs_config()["nav"]):
        html = out / (page[: -len(".md")] + "/index.html" if not page.endswith("index.md")
                      else page[: -len("index.md")] + "index.html")
        assert html.is_file(), page
    assert (out / "study" / "plots" / "feature_nodes.png").is_file()  # served from benchmarks/results by the hook


def test_every_page_is_in_the_navigation():
    """A page left out of ``nav`` (docs/deployment.md, say) must be added there, under its section."""
    nav = set(nav_pages(mkdocs_config()["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == nav


def documented_arguments(cls) -> set[str]:
    doc = inspect.getdoc(cls) or ""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    return set(re.findall(r"^    (\w+):", args, flags=re.MULTILINE))


def test_the_configuration_page_lists_every_key():
    """The page's key tables are the classes' Args sections: each must name every constructor argument,
    so the page lists what ``hsl fit --print_config`` prints. The trunk's and the optimizer's
    arguments are documented once, on Backbone and BinaryTaskModule, which the page also renders."""
    from hsl_lightning.models.backbones import Backbone
    from hsl_lightning.modules.base import BinaryTaskModule

    shared = {"backbone", "in_chans", "pretrained", "weights"} | documented_arguments(BinaryTaskModule)
    assert {"name", "in_chans", "pretrained", "weights"} <= documented_arguments(Backbone)
    missing = {}
    for cls in CONFIGURED:
        params = set(inspect.signature(cls).parameters) - {"self", "args", "kwargs"}
        own = documented_arguments(cls)
        lacking = params - own - (shared if issubclass(cls, BinaryTaskModule) else set())
        if lacking:
            missing[cls.__name__] = sorted(lacking)
    assert missing == {}
    page = (DOCS / "configuration.md").read_text()
    for cls in CONFIGURED:  # by the defining module: mkdocstrings reads source, not hsl_lightning's lazy names
        assert f"::: {cls.__module__}.{cls.__name__}" in page, cls.__name__


def test_every_strategy_has_a_page_naming_its_options():
    for name, cls in STRATEGIES.items():
        page = (DOCS / "strategies" / f"{name}.md").read_text()
        assert f"::: {cls.__module__}.{cls.__name__}" in page, name
        for option in inspect.signature(cls).parameters:
            assert f"`{option}`" in page, (name, option)


def test_the_readme_is_short_and_its_set_up_commands_are_what_ci_runs():
    """The README is for a newcomer (at most 250 lines; the rest is on the site), and its two set-up
    commands are exactly those .ci/run runs on a clean clone, so CI checks what a newcomer types."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    set_up = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", set_up, flags=re.DOTALL)
    assert len(commands) == 2
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command.strip() in ci, command
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links and [link for link in links if not link.startswith("http") and not (ROOT / link).exists()] == []
