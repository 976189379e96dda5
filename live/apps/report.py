"""The demo report: figures and numbers from recorded sessions, compared with ground truth where it exists.

:func:`write_report` reads only session files (format v1) and, when present, the simulator's ground truth next to
each (``<session>.truth.json``), so it works on live, replayed and real sessions alike; comparisons with truth
appear only where truth exists. It writes ``report.html``, ``report.json`` (the numbers) and ``figures/*.png``.
The sections are :mod:`~stemlive.live.apps.report_tilt` and :mod:`~stemlive.live.apps.report_eels`.

Truth records used (see :mod:`stemlive.simulators.truth`): ``frame`` (per rendered HAADF frame: drift, field
shift, scan centre), ``session_frame`` (which rendered frame each streamed frame is, written by ``stemlive demo``),
``spectrum`` (per spectrum: probe position, temperature, region) and ``eels_model`` (true interface and peaks).
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.apps.report_eels import eels_section
from stemlive.live.apps.report_tilt import tilt_series_section

__all__ = ["write_report"]


def _finite(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> Python."""
    if isinstance(x, Mapping):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return _finite(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


# ------------------------------------------------------------------------------------------------ the report
HEADLINE_SOURCES = {
    "drift_rms_error_px": ("tilt_series",), "true_drift_max_px": ("tilt_series",),
    "sharpness_gain": ("tilt_series",),
    "ari": ("eels_line_scan", "eels_thermometry"),
    "peak_centre_mae_meV": ("eels_line_scan", "eels_thermometry"),
    "temperature_bias_percent": ("eels_thermometry", "eels_line_scan"),
    "temperature_pull_rms": ("eels_thermometry", "eels_line_scan"),
    "interface_drop_K": ("eels_thermometry",), "interface_drop_err_K": ("eels_thermometry",),
    "interface_drop_true_K": ("eels_thermometry",), "interface_drop_error_K": ("eels_thermometry",),
    "interface_width_nm": ("eels_thermometry",),
}


def _headline(sections: Mapping[str, Mapping[str, Any]], tomo: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, sources in HEADLINE_SOURCES.items():
        for src in sources:
            value = sections.get(src, {}).get(key)
            if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
                out[key] = value
                break
    if tomo and tomo.get("correlation") is not None:
        out["tomo_correlation"] = float(tomo["correlation"])
    return out


def write_report(out_dir: str | Path, sessions: Mapping[str, str | Path], tomo: Mapping[str, Any] | None = None, *,
                 timings: Mapping[str, float] | None = None, config: Mapping[str, Any] | None = None) -> Path:
    """Write ``report.html``, ``report.json`` and ``figures/*.png`` for recorded sessions.

    Parameters
    ----------
    out_dir
        Output folder (created).
    sessions
        ``{key: session path}``; the kind is read from each file (``tilt_series`` or an EELS line scan). Keys
        name the sections (``stemlive demo`` uses ``tilt_series``, ``eels_line_scan``, ``eels_thermometry``).
    tomo
        ``stemlive demo``'s tomography result (paths ``png``, ``volume``, ``emd``, and ``correlation`` with the
        true atoms), or None.
    timings, config
        Extra numbers copied into ``report.json`` and the page.

    Returns
    -------
    Path
        ``report.html``.
    """
    from stemlive.live.storage.session import SessionReader

    out = Path(out_dir)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict[str, Any]] = {}
    figs: dict[str, list[str]] = {}
    for key, path in sessions.items():
        with SessionReader(path) as r:
            kind = r.kind
        if kind == "tilt_series":
            sections[key], figs[key] = tilt_series_section(Path(path), figures)
        else:
            sections[key], figs[key] = eels_section(key, Path(path), figures)
        sections[key]["kind"] = kind
    if tomo and tomo.get("png") and Path(tomo["png"]).exists():
        shutil.copy(tomo["png"], figures / "reconstruction_slices.png")
        figs["tomography"] = ["reconstruction_slices.png"]
    for key in ("atoms_structure_png", "atoms_strain_png"):  # `stemlive tomo atoms` figures (issue 14)
        if tomo and tomo.get(key) and Path(tomo[key]).exists():
            name = f"atomic_model_{key.split('_')[1]}.png"
            shutil.copy(tomo[key], figures / name)
            figs.setdefault("tomography", []).append(name)
    report = {"headline": _headline(sections, tomo), "sections": sections, "tomography": dict(tomo or {}),
              "timings": dict(timings or {}), "config": dict(config or {}),
              "sessions": {k: str(v) for k, v in sessions.items()}}
    (out / "report.json").write_text(json.dumps(_finite(report), indent=1), encoding="utf-8")
    page = out / "report.html"
    page.write_text(_html(report, figs), encoding="utf-8")
    return page


# ------------------------------------------------------------------------------------------------ HTML
def _fmt(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return f"{v[0]:.1f} &plusmn; {v[1]:.1f}"
    if isinstance(v, float):
        return "&ndash;" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(d: Mapping[str, Any]) -> str:
    rows = [{"quantity": k, "value": v} for k, v in d.items() if not isinstance(v, list | dict)]
    return _table(rows)


def _html(report: Mapping[str, Any], figs: Mapping[str, list[str]]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>stemlive demo report</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:auto} table{border-collapse:collapse;margin:8px 0}",
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px} img{max-width:100%}</style></head><body>",
             "<h1>stemlive demo report</h1>",
             "<p>Simulated instrument, fast mode. Numbers compare the live pipeline's results with the simulator's "
             "ground truth where it exists.</p><h2>Headline</h2>", _kv(report["headline"])]
    titles = {"tilt_series": "Tilt series", "eels_line_scan": "EELS line scan (MoS2-WSe2)",
              "eels_thermometry": "EELS thermometry (AlN-SiC)", "tomography": "Tomography"}
    for key, section in report["sections"].items():
        parts.append(f"<h2>{html.escape(titles.get(key, key))}</h2>")
        parts.append(_kv(section))
        if section.get("peak_table"):
            parts.append("<h3>Peaks (meV) next to the reference table (Sci. Adv. 7, eabi6699, table S3)</h3>")
            parts.append(_table(section["peak_table"]))
        if section.get("peaks"):
            parts.append("<h3>Fitted peaks vs simulated centres</h3>" + _table(section["peaks"]))
        parts.extend(f"<p><img src='figures/{html.escape(f)}'></p>" for f in figs.get(key, []))
    if report.get("tomography"):
        parts.append("<h2>Tomography</h2>" + _kv(report["tomography"]))
        parts.extend(f"<p><img src='figures/{html.escape(f)}'></p>" for f in figs.get("tomography", []))
    if report.get("timings"):
        parts.append("<h2>Timings (s)</h2>" + _kv(report["timings"]))
    parts.append("</body></html>")
    return "\n".join(parts)
