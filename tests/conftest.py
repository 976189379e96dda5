"""Shared pytest fixtures."""

from __future__ import annotations

import os

# Qt must never try to open a display in tests unless a test asks for one explicitly.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
