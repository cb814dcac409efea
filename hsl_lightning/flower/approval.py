"""What a site agrees to run: the run's digest, the site's approvals, and the classes a run may name.

Each site enforces its own policy, after NVFlare's federated authorization:

- **The run's digest** (:func:`run_digest`): SHA-256 over what the site would run: the run's
  ``hsl fit`` YAML exactly as the ClientApp receives it (the run config's ``hsl-config``), the run
  directory (``run-dir``) and the app's components (the ServerApp and ClientApp that
  ``hsl flower app`` names). ``hsl flower app`` prints it and writes it into the app folder
  (``DIGEST.txt``); ``hsl flower digest APP`` recomputes it from an app folder a site was sent.
- **The site's approvals**: its node config names a file of approved digests
  (``approved-runs="/srv/hsl/approved.txt"``: one digest per line, ``#`` starts a comment), read at
  every message, so a site approves a new run without restarting its SuperNode
  (``hsl flower approve --file FILE DIGEST``). The ClientApp refuses any other run before it starts
  a worker or builds anything (:func:`check_run`); a SuperNode without ``approved-runs`` refuses
  every run. A :class:`~.protocol.Stop` is honoured whatever the run: it can only end a site's
  worker, never start one.
- **The classes a run may name** (:func:`check_class_paths`): whatever was approved, the run's YAML
  and the site's data config may name only hsl_lightning's own classes (timm backbones and
  optimizers are given by name, as strings). Checked without importing anything in the ClientApp
  and again in :class:`~.site.Site` before the configuration is parsed, where jsonargparse then
  parses with an import allow-list of ``hsl_lightning`` alone (:func:`hsl_imports_only`).

Standard library and PyYAML only: Flower starts a ClientApp process for every message, and this
module is imported there (no torch, no Lightning).
"""

from __future__ import annotations

import ast
import datetime
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import yaml

from hsl_lightning.errors import HSLError

#: the components ``hsl flower app`` writes into an app's pyproject.toml
SERVERAPP = "hsl_lightning.flower.app:server"
CLIENTAPP = "hsl_lightning.flower.app:client"
#: the node config key that names a site's file of approved digests
NODE_KEY = "approved-runs"
#: the file in an app folder that holds its digest
DIGEST_FILE = "DIGEST.txt"
#: an example path for a site's approvals, in messages
EXAMPLE_FILE = "/srv/hsl/approved.txt"
#: the version of what :func:`run_digest` hashes (a change here changes every digest)
FORMAT = "hsl-run-digest/1"
PACKAGE = "hsl_lightning"

_DIGEST = re.compile(r"[0-9a-f]{64}")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the run's digest
def run_digest(config_text: str, run_dir: str = "", serverapp: str = SERVERAPP, clientapp: str = CLIENTAPP) -> str:
    """SHA-256 (hex) of a run as a site would run it: its ``hsl fit`` YAML (the run config's
    ``hsl-config``, character for character), its run directory and the app's components."""
    payload = json.dumps({"format": FORMAT, "hsl-config": str(config_text), "run-dir": str(run_dir or ""),
                          "serverapp": serverapp, "clientapp": clientapp}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def digest_of_run_config(run_config) -> str:
    """The digest of the run whose (Flower) run config is ``run_config``, as the ClientApp sees it."""
    return run_digest(str(run_config.get("hsl-config") or ""), str(run_config.get("run-dir") or ""))


def app_digest(app: str | os.PathLike) -> str:
    """The digest of the run an app folder (``hsl flower app``) submits, from its pyproject.toml as
    Flower reads it."""
    import tomllib

    path = Path(app) / "pyproject.toml"
    if not path.is_file():
        raise HSLError(f"{path} does not exist: give the folder `hsl flower app` wrote.")
    try:
        project = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise HSLError(f"{path} is not valid TOML: {exc}") from exc
    app_table = project.get("tool", {}).get("flwr", {}).get("app", {})
    config, components = app_table.get("config", {}), app_table.get("components", {})
    if "hsl-config" not in config:
        raise HSLError(f"{path} has no hsl-config in [tool.flwr.app.config]: it is not an app `hsl flower app` wrote.")
    return run_digest(str(config["hsl-config"]), str(config.get("run-dir") or ""),
                      str(components.get("serverapp", "")), str(components.get("clientapp", "")))


def write_digest(app: str | os.PathLike) -> str:
    """Write ``DIGEST.txt`` into an app folder (its digest, then how a site approves it); the digest."""
    digest = app_digest(app)
    (Path(app) / DIGEST_FILE).write_text(
        f"{digest}\n# The SHA-256 of this run as the sites will run it (its hsl-config, run-dir and components).\n"
        f"# A site approves it with: hsl flower approve --file {EXAMPLE_FILE} {digest}\n"
        "# (--file: the file its node config's approved-runs names). `hsl flower digest APP` recomputes it.\n")
    return digest


def read_digest(app: str | os.PathLike) -> str:
    """The digest ``hsl flower app`` wrote into an app folder's ``DIGEST.txt``."""
    path = Path(app) / DIGEST_FILE
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            return _valid_digest(entry, str(path))
    raise HSLError(f"{path} holds no digest.")


# ---------------------------------------------------------------------- a site's approvals
def _valid_digest(text: str, where: str) -> str:
    digest = text.strip().lower()
    if not _DIGEST.fullmatch(digest):
        raise HSLError(f"{where}: {text.strip()!r} is not a run digest (64 hexadecimal digits, as `hsl flower app` "
                       "prints it).")
    return digest


def read_approved(path: str | os.PathLike) -> set[str]:
    """The digests a site's approvals file lists (one per line; ``#`` starts a comment). A line that
    is not a digest is an error (the site refuses every run until it is fixed), never ignored."""
    path = Path(path).expanduser()
    approved = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            approved.add(_valid_digest(entry.split()[0], f"{path}, line {number}"))
    return approved


def approve(path: str | os.PathLike, digest: str, note: str | None = None) -> bool:
    """``hsl flower approve``: add ``digest`` to a site's approvals file (created when missing), with
    the time and ``note`` as a comment. False when it was listed already."""
    digest = _valid_digest(digest, "hsl flower approve")
    path = Path(path).expanduser()
    if path.is_file() and digest in read_approved(path):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "" if path.is_file() else ("# Runs this site approved (hsl flower approve): one SHA-256 digest per line; "
                                      "'#' starts a comment.\n")
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        head = "\n"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    note = " ".join((note or "").split())  # one line
    with path.open("a") as f:
        f.write(f"{head}{digest}  # approved {stamp}{': ' + note if note else ''}\n")
    return True


def check_approved(node_config, run_config, site: str) -> str:
    """Refuse (HSLError naming the site, the digest and how to approve it) a run this site has not
    approved; its digest when approved. Reads the approvals file now: a run approved while the
    SuperNode runs is accepted at its next message."""
    digest = digest_of_run_config(run_config)
    command = f"hsl flower approve --file {{file}} {digest}"
    where = node_config.get(NODE_KEY)
    if not where:
        raise HSLError(f"Site {site} refuses run {digest}: its node config names no {NODE_KEY} file, so it runs no "
                       f"run at all (secure by default). To set it up, restart the SuperNode with "
                       f"{NODE_KEY}=\"{EXAMPLE_FILE}\" in --node-config, then approve this run after reviewing its "
                       f"configuration: {command.format(file=EXAMPLE_FILE)}")
    path = Path(str(where)).expanduser()
    if not path.is_file():
        raise HSLError(f"Site {site} refuses run {digest}: its approvals file {path} ({NODE_KEY} in its node config) "
                       f"does not exist. Approve this run after reviewing its configuration: "
                       f"{command.format(file=path)} (this creates the file; no restart needed)")
    try:
        approved = read_approved(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise HSLError(f"Site {site} refuses run {digest}: its approvals file {path} cannot be read ({exc}).") from exc
    except HSLError as exc:
        raise HSLError(f"Site {site} refuses run {digest}: its approvals file is broken: {exc}") from exc
    if digest not in approved:
        raise HSLError(f"Site {site} refuses run {digest}: the site has not approved it (not in {path}). To approve "
                       f"it after reviewing its configuration: {command.format(file=path)} (no restart needed)")
    return digest


def check_run(node_config, run_config, site: str, data_config: str | None = None) -> str:
    """The ClientApp's check before it forwards a request: the run must be approved here
    (:func:`check_approved`), and its YAML and the site's data config may name only hsl_lightning's
    classes (:func:`check_class_paths`, imports nothing). The run's digest."""
    digest = check_approved(node_config, run_config, site)
    check_class_paths(str(run_config.get("hsl-config") or ""), f"Site {site} refuses run {digest}: the run's "
                      "configuration")
    check_class_paths(data_config, f"Site {site} refuses run {digest}: its data config")
    return digest


def describe_approvals(node_config, site: str) -> str:
    """One line for ``hsl flower supernode``: where the site's approvals are and how many; a broken
    approvals file is an error."""
    where = node_config.get(NODE_KEY)
    if not where:
        return (f"site {site}: no {NODE_KEY} in --node-config, so this SuperNode will refuse every run; add "
                f"{NODE_KEY}=\"{EXAMPLE_FILE}\" and approve runs with `hsl flower approve --file {EXAMPLE_FILE} "
                "DIGEST`")
    path = Path(str(where)).expanduser()
    if not path.is_file():
        return (f"site {site}: {path} ({NODE_KEY}) does not exist yet: every run is refused until one is approved "
                f"(`hsl flower approve --file {path} DIGEST`)")
    try:
        count = len(read_approved(path))
    except HSLError as exc:
        raise HSLError(f"Site {site}: its approvals file is broken: {exc}") from exc
    return f"site {site}: {count} approved run(s) in {path}"


# ---------------------------------------------------------------------- the classes a run may name
#: where jsonargparse reads a string as a class path or as a file holding a sub-configuration
#: (hsl fit's class-typed fields and sections): a string there must be one of hsl_lightning's classes
CLASS_POSITIONS = frozenset({("model",), ("data",), ("federation",), ("data", "primary"), ("data", "sat"),
                             ("data", "scenario"), ("data", "external"), ("federation", "privacy")})
#: keys by which jsonargparse reads another configuration file
FILE_KEYS = frozenset({"config", "__path__"})


def _dotted(text: str) -> bool:
    """Whether ``text`` has the form of an import path (what jsonargparse's ``import_object`` takes)."""
    parts = text.split(".")
    return len(parts) > 1 and all(part.isidentifier() for part in parts)


def _importable(top: str) -> bool:
    """Whether a top-level module of that name exists here (found, not imported)."""
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _module_file(module: str) -> Path | None:
    """The source file of an hsl_lightning module (``hsl_lightning.a.b``), found without importing it."""
    parts = module.split(".")
    if parts[0] != PACKAGE or not all(part.isidentifier() for part in parts):
        return None
    base = _PACKAGE_DIR.joinpath(*parts[1:])
    candidates = [base / "__init__.py"] if len(parts) == 1 else [base.with_suffix(".py"), base / "__init__.py"]
    return next((path for path in candidates if path.is_file()), None)


@functools.lru_cache(maxsize=None)
def _top_level(path: Path) -> tuple:
    return tuple(ast.parse(path.read_text(), str(path)).body)


def _lazy_names() -> dict:
    """hsl_lightning's public classes and the modules that define them (imports no torch)."""
    import hsl_lightning

    return dict(getattr(hsl_lightning, "_LAZY", {}))


def _defines_class(module: str, name: str, depth: int = 0) -> bool:
    """Whether hsl_lightning module ``module`` defines class ``name`` at its top level, or imports it
    there from an hsl_lightning module that does: read from the source, nothing imported."""
    path = _module_file(module)
    if path is None or depth > 10:
        return False
    if module == PACKAGE and name in _lazy_names():
        return _defines_class(_lazy_names()[name], name, depth + 1)
    body = _top_level(path)
    if any(isinstance(node, ast.ClassDef) and node.name == name for node in body):
        return True
    for node in body:
        if not isinstance(node, ast.ImportFrom):
            continue
        for alias in node.names:
            if (alias.asname or alias.name) != name:
                continue
            source = node.module or ""
            if node.level:  # relative: from the package that holds this module
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                source = ".".join([*package, *([source] if source else [])])
            if source.split(".")[0] == PACKAGE and _defines_class(source, alias.name, depth + 1):
                return True
    return False


def allowed_class_path(value: str) -> bool:
    """Whether ``value`` names one of hsl_lightning's own classes (statically: the module is a file
    of the package and defines, or re-exports from the package, a class of that name)."""
    if not isinstance(value, str):
        return False
    if value.isidentifier():  # a bare class name: jsonargparse looks it up among the expected base's subclasses
        return value in _lazy_names()
    if not _dotted(value) or value.split(".")[0] != PACKAGE:
        return False
    module, _, name = value.rpartition(".")
    return _defines_class(module, name)


def resolve_class(value: str) -> type:
    """The class ``value`` names, imported (only hsl_lightning's modules, after :func:`allowed_class_path`),
    checked to be a class defined in hsl_lightning."""
    module, _, name = value.rpartition(".") if "." in value else (PACKAGE, ".", value)
    obj = getattr(importlib.import_module(module), name, None)
    owner = getattr(obj, "__module__", "") or ""
    if not (inspect.isclass(obj) and (owner == PACKAGE or owner.startswith(PACKAGE + "."))):
        raise HSLError(f"{value!r} is not a class defined in hsl_lightning")
    return obj


def check_class_paths(text: str | None, source: str, resolve: bool = False) -> list[str]:
    """Refuse a configuration (YAML text) that names anything but hsl_lightning's own classes, before
    anything is imported: a ``class_path`` under any key (at any depth, also inside a string that
    holds YAML), a string with the form of an import path that names hsl_lightning or a module
    found here (``os.system``, ``builtins.eval``), a string where jsonargparse would read a class
    path or another file (``CLASS_POSITIONS``), and keys that include another file (``config``).
    ``source`` starts the error message (e.g. *Site hospital1 refuses run ...: the run's
    configuration*); ``resolve``: also import each class (hsl_lightning's modules only) and check it
    is a class defined in hsl_lightning. Returns the class paths named, in order."""
    if not text:
        return []
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HSLError(f"{source} is not valid YAML: {exc}") from exc
    found: list[str] = []
    rule = ("a site instantiates only hsl_lightning's own classes (hsl_lightning.<Class>); timm backbones and "
            "optimizers are given by name, as strings")

    def refuse(value, key: tuple, why: str):
        where = ".".join(key) or "the top level"
        raise HSLError(f"{source} names {value!r} at {where}: {why}; {rule}.")

    def check(value, key: tuple) -> None:
        if not allowed_class_path(value):
            refuse(value, key, "not one of hsl_lightning's classes")
        if resolve:
            try:
                resolve_class(value)
            except (HSLError, ImportError, AttributeError) as exc:
                refuse(value, key, str(exc))
        found.append(value)

    def walk(node, key: tuple, depth: int = 0) -> None:
        if depth > 50:
            refuse("...", key, "nested too deeply")
        if isinstance(node, dict):
            for k, value in node.items():
                name = str(k)
                if name in FILE_KEYS:
                    refuse(value, (*key, name), "a site does not read other configuration files named by the run")
                if name == "class_path":
                    check(value, (*key, name))
                else:
                    walk(value, (*key, name), depth + 1)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, (*key, f"[{i}]"), depth + 1)
        elif isinstance(node, str):
            if key in CLASS_POSITIONS or (len(key) > 1 and key[-1].startswith("[") and key[:-1] in CLASS_POSITIONS):
                check(node, key)  # a class path, or a sub-configuration file jsonargparse would read: only ours
            elif _dotted(node) and (node.split(".")[0] == PACKAGE or _importable(node.split(".")[0])):
                check(node, key)
            if "class_path" in node:  # YAML inside a string (jsonargparse parses some strings as YAML)
                try:
                    inner = yaml.safe_load(node)
                except yaml.YAMLError:
                    inner = None
                if isinstance(inner, (dict, list)):
                    walk(inner, key, depth + 1)

    walk(tree, ())
    return found


def check_site_config(config: str, data_config: str | None, site: str) -> list[str]:
    """:class:`~.site.Site`'s check before it parses anything: the run's YAML and the site's data
    config name only hsl_lightning's classes, each resolved to a class defined in hsl_lightning."""
    named = check_class_paths(config, f"Site {site} refuses the run: its configuration", resolve=True)
    return named + check_class_paths(data_config, f"Site {site} refuses the run: its data config", resolve=True)


@contextmanager
def hsl_imports_only():
    """Within the block, jsonargparse imports no value's class path outside hsl_lightning (its import
    allow-list, jsonargparse >= 4.50; process-wide, restored on leaving). Older jsonargparse: no-op
    (:func:`check_class_paths` still applies)."""
    saved = None
    try:
        from jsonargparse import _common, set_parsing_settings

        settings = _common.parsing_settings
        saved = {key: settings[key] for key in ("import_path_verdicts", "import_paths_enforced")}
        set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=[PACKAGE])
    except (ImportError, AttributeError, KeyError, TypeError):
        if saved is not None:
            settings.update(saved)
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            settings.update(saved)
