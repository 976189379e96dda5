"""``stemlive info``: a human-readable summary of a session file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.pipeline.problems import describe_lines as _problem_lines
from stemlive.live.storage.session_format import SURVEYS
from stemlive.live.storage.session_format import iso as _iso
from stemlive.live.storage.session_reader import SessionReader, validate


def describe(path: str | Path) -> str:
    """A human-readable summary of a session file: the output of ``stemlive info FILE``.

    Raises
    ------
    SessionFormatError
        If the file is not a stemlive session file (or of a newer format version).
    """
    path = Path(path)
    validate(path)
    with SessionReader(path) as r:
        lines = [f"{path}", f"  kind:        {r.kind}", f"  status:      {r.status}"]
        if not r.closed:
            lines.append(f"  NOT CLOSED: writer stopped while recording; {_recovered(r)} recovered")
        elif r.message:
            lines.append(f"  message:     {r.message}")
        if r.gaps:
            lines.append(f"  seq gaps:    {r.gaps}")
        lines += [f"  session id:  {r.session_id}", f"  created:     {r.created}"]
        rebuilt = [what for what, stored in (("session_start rebuilt from the root attributes", r.stored_start),
                                             ("arrival order = row order (no seq)", r.stored_seq)) if not stored]
        if rebuilt:
            lines.append("  v1 minimum:  " + "; ".join(rebuilt))
        source = r.settings.get("source")
        if isinstance(source, dict) and source.get("files"):  # written by stemlive import
            readers = ", ".join(str(x) for x in source.get("readers", []))
            lines.append(f"  imported:    {', '.join(str(f) for f in source['files'])} ({readers})")
        if r.closed_at:
            lines.append(f"  closed:      {r.closed_at}")
        lines += _describe_data(r)
        lines += _describe_results(r)
        lines += _problem_lines(r.file)  # analysis status and problems, one line each
        lines.append(f"  file size:   {_size(os.path.getsize(path))}")
    return "\n".join(lines)


def _recovered(r: SessionReader) -> str:
    parts = []
    if r.kind == "tilt_series" or r.n_frames:
        parts.append(f"{r.n_frames} complete frames")
    if r.kind != "tilt_series" or r.n_spectra:
        parts.append(f"{r.n_spectra} complete spectra")
    return " and ".join(parts)


def _describe_data(r: SessionReader) -> list[str]:
    lines: list[str] = []
    if "tilt_series" in r.file:
        frames = r.frames()
        a = r.attrs("tilt_series")
        tilts = np.unique(r.frame_table()["tilt_index"]).size
        lines.append(
            f"  frames:      {frames.shape[0]} x {frames.shape[1]} x {frames.shape[2]} {frames.dtype} ({tilts} tilts)"
        )
        lines.append(f"    pixel size {_num(a.get('pixel_size_nm'))} nm, dwell {_num(a.get('dwell_us'))} us")
    if "eels" in r.file:
        spectra = r.spectra()
        a = r.attrs("eels")
        points = np.unique(r.spectrum_table()["point_index"]).size
        lines.append(f"  spectra:     {spectra.shape[0]} x {spectra.shape[1]} {spectra.dtype} ({points} points)")
        calib = f"    dispersion {_num(a.get('dispersion_meV'))} meV/channel, exposure {_num(a.get('exposure_ms'))} ms"
        if "scan_shape" in a:
            calib += f", scan shape {list(np.asarray(a['scan_shape']).tolist())}"
        lines.append(calib)
    surveys = [w for w in SURVEYS if r.survey(w) is not None]
    if surveys:
        lines.append("  surveys:     " + ", ".join(f"{w} {r.file['survey'][w].shape}" for w in surveys))
    span = r.time_span
    if span is not None:
        lines.append(f"  time span:   {_iso(span[0])} .. {_iso(span[1])} ({span[1] - span[0]:.3f} s)")
    return lines


def _describe_results(r: SessionReader) -> list[str]:
    names = r.result_names()
    if not names:
        return ["  results:     none"]
    lines = ["  results:"]
    for stage, entries in names.items():
        for name, shape in entries.items():
            lines.append(f"    {stage}/{name} {shape} {r.file['results'][stage][name].dtype}")
            if (stage, name) == ("eels", "temperature_K"):
                lines += _zero_loss_line(r.file["results"][stage][name].attrs)
    return lines


def _zero_loss_line(a: Any) -> list[str]:
    """The zero-loss family of the temperatures and, with power-law tails, the shape their spectra shared."""
    if "zlp_shape" not in a:
        return []
    line = f"      zero loss: {a['zlp_shape']}"
    if "zlp_m" in a:
        line += (f"; tail shape shared by {int(a['zlp_shape_spectra'])} spectra: m {float(a['zlp_m']):.3f} +- "
                 f"{float(a['zlp_m_err']):.3f}, p {float(a['zlp_p']):.4f} +- {float(a['zlp_p_err']):.4f}")
    elif "zlp_shape_not_shared" in a:
        line += f"; tail shape not shared: {a['zlp_shape_not_shared']}"
    return [line]


def _num(value: Any) -> str:
    return "?" if value is None else f"{float(value):g}"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
