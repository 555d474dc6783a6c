"""Where the package's lines for people go: the ``log`` callables the API takes.

stdout belongs to results (``--json``); progress, warnings and notes go to stderr, a line at a
time and at once, so they interleave in order with everything else the process prints.
"""

from __future__ import annotations

import sys


def say(line: str) -> None:
    """A line on stderr, flushed."""
    print(line, file=sys.stderr, flush=True)


def quiet(line: str) -> None:
    """A ``log`` that says nothing (ranks other than 0, reads whose origin was said already)."""
