"""The package's shape: modules import each other without cycles, and the round loop's files stay in
short functions. Both read the source (imports inside functions count), so a change that breaks
either fails here, not in a reviewer's head."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hsl_lightning"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, at any depth of its code (``from pkg import x``
    counts as importing ``pkg.x`` when that is a module, else ``pkg``)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != here}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_reader_counts_imports_inside_functions():
    known = modules()
    cli = imports_of(PACKAGE / "cli.py", known)
    assert "hsl_lightning.config" in cli and "hsl_lightning.benchmark" in cli  # the latter imported in a function


def test_no_import_cycle_between_modules_of_the_package():
    known = modules()
    graph = {name: imports_of(path, known) for name, path in known.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


#: the subpackages, each one node of the package-level import graph (a top-level module is a node of its own)
SUBPACKAGES = ("federation", "inference", "flower", "data", "models", "modules", "benchmark", "analysis")


def package_node(module: str) -> str:
    """The node of the package-level graph that ``module`` belongs to: its subpackage, else itself."""
    for sub in SUBPACKAGES:
        if module == f"hsl_lightning.{sub}" or module.startswith(f"hsl_lightning.{sub}."):
            return f"hsl_lightning.{sub}"
    return module


def package_graph() -> dict[str, set[str]]:
    """Who imports whom between subpackages and top-level modules. The root (``hsl_lightning``, its
    ``__init__``) is a node too, and its lazy re-exports (PEP 562: module names as strings in
    ``_LAZY``) count as its imports, so the root sits above the subpackages it re-exports: a module
    of the package that imports the root (``from hsl_lightning import Federation``) closes a cycle
    and fails here; inside the package, import from the module that defines the name."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = imports_of(path, known)
        if name == "hsl_lightning":
            targets |= {n.value for n in ast.walk(ast.parse(path.read_text()))
                        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in known}
        here = package_node(name)
        graph.setdefault(here, set()).update(package_node(t) for t in targets if package_node(t) != here)
    return graph


def test_no_import_cycle_between_subpackages():
    """A cycle between two subpackages (``inference`` scoring with ``federation``'s predictions while
    ``federation`` wrote ``inference``'s checkpoints with its thresholds) is no cycle of modules, yet
    neither package can be read, tested or moved without the other: what both need lives below
    both (``hsl_lightning.metrics``)."""
    graph = package_graph()
    assert {"hsl_lightning", "hsl_lightning.federation", "hsl_lightning.metrics"} <= set(graph)
    assert {"hsl_lightning.data", "hsl_lightning.federation"} <= graph["hsl_lightning"]  # the lazy re-exports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_nothing_imports_the_command_line_module():
    known = modules()
    users = sorted(name for name, path in known.items() if "hsl_lightning.cli" in imports_of(path, known)
                   and name != "hsl_lightning.__main__")
    assert users == []


def test_functions_of_the_federation_package_are_at_most_60_lines():
    long = []
    for path in sorted((PACKAGE / "federation").rglob("*.py")):  # strategies/ included
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


#: files over 500 lines allowed for now because another change is splitting them (none left: the
#: benchmark report was split into results, stats, sections, verdicts and plots); the test below fails
#: once such a file is split, so that this set only shrinks
OVER_500_ELSEWHERE: set[str] = set()


def test_no_file_of_the_package_is_over_500_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in sorted(PACKAGE.rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > 500}
    assert sorted(set(long) - OVER_500_ELSEWHERE) == [], "split these files (one concern per file): " + str(long)
    assert sorted(OVER_500_ELSEWHERE - set(long)) == [], "at most 500 lines now: remove from OVER_500_ELSEWHERE"


def test_each_strategy_file_opens_with_its_paper_and_rule_and_registers_what_it_defines():
    from hsl_lightning.federation.strategies import STRATEGIES

    folder = PACKAGE / "federation" / "strategies"
    for path in sorted(folder.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.splitlines()) >= 3, f"{path.name} opens with no docstring naming the paper and rule"
    homes = {cls.__module__.rpartition(".")[2] for cls in STRATEGIES.values()}
    assert homes == {p.stem for p in folder.glob("*.py")} - {"__init__", "base"}  # every family file registers


def test_nothing_refers_to_the_old_deploy_package_or_strategies_file():
    """``deploy/`` became ``inference/`` (using a trained model), so that it is not taken for training
    across real sites (``flower/``), and ``federation/strategies.py`` became a package of one file per
    family: an import of an old name fails only when reached, and a docstring or page naming one
    sends a reader to a file that is not there."""
    root = PACKAGE.parent
    paths = [*PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py"), *(root / "benchmarks").glob("*.py"),
             *(root / "notebooks").glob("*.ipynb"), root / "README.md", *(root / "docs").rglob("*.md")]
    old = ("hsl_lightning.deploy", "deploy/", "federation/strategies.py", "test_deploy.py")
    stale = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in paths if p.is_file() and p != Path(__file__).resolve()
             for i, line in enumerate(p.read_text().splitlines(), 1) if any(o in line for o in old)]
    assert stale == []


def test_the_deployment_reaches_the_round_loop_through_public_names_only():
    """flower/ used to override and call the Federation's private methods (``_setup``,
    ``_train_and_sum``, ...): renaming one changed the deployment without an error. Now it implements
    ``RoundPhases`` and calls public methods; a private name of a federation object there fails here."""
    import re

    private = re.compile(r"\b(?:fed|federation|self\.federation)\._[a-z]\w*")
    found = [f"{path.name}:{i}: {line.strip()}" for path in sorted((PACKAGE / "flower").glob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert found == []
    from hsl_lightning.federation.federation import Federation
    from hsl_lightning.flower.server import SitePhases

    assert not issubclass(SitePhases, Federation)
