"""The ``stemlive`` command exactly as a user types it: the console script installed next to this Python."""

from __future__ import annotations

import os
import shutil
import sys


def stemlive_command() -> list[str]:
    """``[path of the stemlive console script]``, the entry point ``pip install`` made (setup.cfg)."""
    exe = shutil.which("stemlive", path=os.path.dirname(sys.executable))
    if exe is None:
        raise RuntimeError(f"no stemlive console script next to {sys.executable}: run `bash bootstrap.sh test`")
    return [exe]


STEMLIVE = stemlive_command()
