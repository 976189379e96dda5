"""Console conventions shared by the ``stemlive`` commands: ``--quiet`` and progress only on a terminal."""

from __future__ import annotations

import sys
from typing import Any

QUIET_HELP = "no progress bars or informational output: only results, warnings and errors"


def is_quiet(args: Any) -> bool:
    """Whether ``-q/--quiet`` was given (handlers print progress and notes only when this is False)."""
    return bool(getattr(args, "quiet", False))


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (redirected logs must get no carriage returns)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return callable(isatty) and bool(isatty())
    except ValueError:  # a closed stream
        return False


def show_progress(args: Any, stream: Any = None) -> bool:
    """Whether to draw progress bars on ``stream`` (default stderr): not ``--quiet``, and a terminal."""
    return not is_quiet(args) and is_terminal(sys.stderr if stream is None else stream)
