"""CI smoke test of the windows: Nion Swift with the stemlive panels and the live viewer during a replay.

Runs ``scripts/screenshots.py`` as a user would (under Xvfb when it is installed, which ``bootstrap.sh test`` does
as root; otherwise Qt's offscreen platform) and checks that it wrote non-blank PNGs of both windows into
``docs/screenshots/``. No pixel comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_screenshots_of_swift_and_the_viewer_during_a_replay(tmp_path: Path) -> None:
    out = ROOT / "docs" / "screenshots"
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}  # a real (virtual) display if any
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshots.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from PIL import Image

    for name in ("viewer.png", "swift.png"):
        path = out / name
        assert path.exists(), f"{name} was not written"
        image = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
        assert image.shape[0] > 200 and image.shape[1] > 300, f"{name} is only {image.shape}"
        assert image.std() > 5.0, f"{name} looks blank (grey-level std {image.std():.1f})"
