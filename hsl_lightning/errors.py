"""User-facing errors.

Anything a user can get wrong (a path, a name, a label, a shape) is reported as an
:class:`HSLError` whose message says what is wrong and what to do. The ``hsl`` command prints
these without a traceback and exits with status 2; library users can catch them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HSLError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """A 'did you mean' phrase for an unknown ``name`` (empty when nothing is close)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
