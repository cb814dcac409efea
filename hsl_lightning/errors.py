"""User-facing errors.

Anything a user can get wrong (a path, a name, a label, a shape) is reported as an
:class:`HSLError` whose message says what is wrong and what to do. The ``hsl`` command prints
these without a traceback and exits with status 2; library users can catch them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class HSLError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """A 'did you mean' phrase for an unknown ``name`` (empty when nothing is close)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def hsl_message(exc: BaseException) -> str | None:
    """The HSLError behind an exception, or None: raised directly, wrapped by jsonargparse while it
    instantiated the config (found through the exception chain), or raised in a spawned rank
    (found in the child's traceback text)."""
    seen = exc
    for _ in range(20):
        if seen is None:
            break
        if isinstance(seen, HSLError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"HSLError: (.+?)\s*$", str(exc), flags=re.S)
    return match.group(1) if match else None
