"""Every public module, class and function of the package says what it is, so that the API reference
(docs/reference/, built from docstrings) has no empty entries.

Read from the source (no import) for the package as a whole; the public API (the names
``hsl_lightning`` and ``hsl_lightning.federation.strategies`` export) is also checked at run time,
method by method, where a method that overrides a documented one inherits its docstring."""

import ast
import inspect
from pathlib import Path

import hsl_lightning
from hsl_lightning.federation import strategies

PACKAGE = Path(__file__).resolve().parents[1] / "hsl_lightning"

#: names allowed to lack a docstring for now because another change owns their file (none left); the
#: test below fails once one of them has a docstring, so that this set only shrinks
PENDING: set[str] = set()


def public_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if not any(part.startswith("_") and part != "__init__.py" for part in p.relative_to(PACKAGE).parts)]


def undocumented_in_source() -> tuple[list[str], set[str]]:
    modules, names = [], set()
    for path in public_files():
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(PACKAGE))
        if not ast.get_docstring(tree):
            modules.append(where)
        for node in tree.body:
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and not node.name.startswith("_") and not ast.get_docstring(node)):
                names.add(f"{where}: {node.name}")
    return modules, names


def test_every_module_and_every_public_class_and_function_has_a_docstring():
    modules, names = undocumented_in_source()
    assert modules == []
    assert sorted(names - PENDING) == []
    assert sorted(PENDING - names) == [], "documented now: remove from PENDING"


def undocumented_api(namespace) -> list[str]:
    missing = []
    for name in namespace.__all__:
        obj = getattr(namespace, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants (STRATEGIES, ACTIVATIONS) and type aliases
        if not (obj.__doc__ or "").strip():  # a class's own: ``inspect.getdoc`` would take its base's
            missing.append(name)
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, property):
                doc = value.__doc__
            elif callable(value) or isinstance(value, (classmethod, staticmethod)):
                doc = inspect.getdoc(getattr(obj, attr))  # inherited from the method it overrides, if any
            else:
                continue
            if not (doc or "").strip():
                missing.append(f"{name}.{attr}")
    return missing


def test_the_public_api_has_a_docstring_on_every_class_function_and_method():
    assert undocumented_api(hsl_lightning) == []
    assert undocumented_api(strategies) == []


def test_the_check_finds_a_missing_docstring(tmp_path, monkeypatch):
    """The checks can fail: an undocumented class, method and module are reported."""
    import types

    class Bare:
        def method(self):
            pass

    namespace = types.SimpleNamespace(__all__=["Bare"], Bare=Bare)
    assert undocumented_api(namespace) == ["Bare", "Bare.method"]
    fake = tmp_path / "hsl_lightning"
    fake.mkdir()
    (fake / "bare.py").write_text("def f():\n    return 1\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert undocumented_in_source() == (["bare.py"], {"bare.py: f"})
