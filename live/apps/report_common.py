"""What the demo report's sections share: the ground truth next to a session and matplotlib figures (Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_truth(session_path: str | Path) -> dict[str, Any] | None:
    """The ground truth next to a session (``<session>.truth.json``), or None."""
    p = Path(session_path)
    path = p.with_name(p.stem + ".truth.json")
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if data.get("format") == "stemlive-truth" else None


def new_figure(w: float, h: float) -> Any:
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=90)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out and write ``fig`` to ``path``."""
    fig.tight_layout()
    fig.savefig(path)
    return path

