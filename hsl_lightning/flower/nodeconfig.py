"""A SuperNode's node config and the site's data config: read without torch or Lightning.

Flower starts a new ClientApp process for every message, and that process reads the node config
before handing the message to the site's worker; whatever it imports is paid on every message.
So this module needs only the standard library and PyYAML.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import yaml

from hsl_lightning.errors import HSLError

#: keys of a data config whose values are files or folders that must exist at the site
PATH_KEYS = ("root", "path", "file", "folder", "csv")


def parse_node_config(text: str) -> dict:
    """Flower's ``--node-config`` string (``key=value`` pairs, strings in double quotes) as a dict."""
    out = {}
    for part in shlex.split(text):
        if "=" not in part:
            raise HSLError(f"--node-config entry {part!r} is not key=value.")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_site_config(path: str | os.PathLike | None) -> str | None:
    """A site's data config file as text (a clear error when it is missing or not YAML)."""
    if not path:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise HSLError(f"The site's data-config file {path} does not exist.")
    text = path.read_text()
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HSLError(f"The site's data-config file {path} is not valid YAML: {exc}") from exc
    return text


def missing_paths(text: str | None) -> list[str]:
    """The files and folders a data config names (under ``root``, ``path``, ``file`` or ``folder``
    keys) that do not exist on this machine (a source with ``download: true`` makes its own)."""
    missing: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            fetched = node.get("download") is True  # a source that downloads its files creates its root
            for key, value in node.items():
                if key in PATH_KEYS and isinstance(value, str) and not fetched and not Path(value).expanduser().exists():
                    missing.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(text) if text else None)
    return missing
