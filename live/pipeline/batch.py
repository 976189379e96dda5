"""Batch analysis of recorded sessions on a Dask cluster: ``stemlive replay FILE... --analyze OUTDIR``.

The same stage code as live and ``replay --analyze`` runs on the workers, and the results are identical to the
in-process ones (the same arrays, bit for bit):

* a session that is not an EELS map is one task: :func:`~stemlive.live.pipeline.replay.replay_analyze` on a worker;
* an EELS map is split by rows of probe positions: each task runs the EELS stage's per-point step (align and
  sum the frames, temperature; :meth:`~stemlive.live.pipeline.eels_stage.EELSStage.flush`) over whole blocks of
  positions (:meth:`~stemlive.live.pipeline.eels_stage.EELSStage.runs`: the stage fits a block together, so a task
  made of whole blocks gives the in-process results), reading them from the session file itself, with the common
  energy axis of the whole map fixed by the task holding the first block (as in-process); the client meanwhile
  records the session into the output file, then merges the workers' per-point state
  (:meth:`~stemlive.live.pipeline.eels_stage.EELSStage.add_points`) and finishes the stage (whole-map datasets,
  segmentation, peak fits, problems) through the same pipeline code as in-process.  The per-point result rows, which the
  final step rewrites whole, are not written one by one.

Without a scheduler address a :class:`distributed.LocalCluster` with 2 single-threaded worker processes is
started (:func:`local_cluster`; stopped afterwards); with one, an existing cluster is used (its workers must see
the session files and the output folder at the same paths; each task undoes Dask's fixed malloc trim threshold
for its duration, :func:`~stemlive.live.analysis._malloc.heap_reuse`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.config import Params
from stemlive.live.pipeline.eels_stage import EELSPoints, EELSStage
from stemlive.live.pipeline.run import SessionRun
from stemlive.live.pipeline.stage import session_params
from stemlive.live.storage.session import SessionReader
from stemlive.live.wire.protocol import Message

log = logging.getLogger(__name__)

__all__ = ["analyze_files", "analyze_map", "local_cluster", "map_rows", "output_path", "open_client"]

DEFAULT_WORKERS = 2


def output_path(source: str | Path, out_dir: str | Path) -> Path:
    """``OUTDIR/<name of the source>``; an existing file is never overwritten."""
    out = Path(out_dir) / Path(source).name
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite a session file")
    return out


def local_cluster(n_workers: int = DEFAULT_WORKERS) -> Any:
    """A :class:`distributed.LocalCluster` of ``n_workers`` single-threaded worker processes for numpy work.

    One thread per process (the cluster runs one task per core; BLAS and OpenMP on one thread too, Dask's
    default ``*_NUM_THREADS=1``), and the workers start *without* Dask's ``MALLOC_TRIM_THRESHOLD_=65536``: that
    setting makes glibc map and zero fresh pages for every numpy temporary above 128 KiB, which cost the EELS map's
    per-point step +50 % of CPU (:mod:`stemlive.live.analysis._malloc`).
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                            silence_logs=logging.WARNING)


def open_client(scheduler: str | None = None, n_workers: int = DEFAULT_WORKERS) -> tuple[Any, Callable[[], None]]:
    """A Dask client: of an existing scheduler, or of a new :func:`local_cluster`. Returns ``(client, close)``."""
    from distributed import Client

    if scheduler:
        client = Client(scheduler)
        return client, client.close
    cluster = local_cluster(n_workers)
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


# ----------------------------------------------------------------------------------------------- maps
def _eels_stage(params: Params, start: Message) -> EELSStage:
    """The session's EELS stage, started (it knows the scan shape and its blocks of positions)."""
    stage = EELSStage(session_params(params, start).get("eels", {}))
    list(stage.start(start))
    return stage


def _point_messages(reader: SessionReader, points: Sequence[int]) -> Iterator[Message]:
    """One spectrum message per probe position in ``points`` (its frames in recorded order)."""
    table = reader.spectrum_table()
    calib = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in reader.attrs("eels").items()
             if k in ("dispersion_meV", "exposure_ms")}
    spectra = reader.file["eels/spectra"]
    wanted = np.isin(table["point_index"], np.asarray(points))
    rows = np.nonzero(wanted)[0]
    if not rows.size:
        return
    block = np.asarray(spectra[int(rows[0]) : int(rows[-1]) + 1])[rows - rows[0]]
    pidx = table["point_index"][rows]
    for p in points:
        sel = np.nonzero(pidx == p)[0]
        if not sel.size:
            continue
        r = rows[sel]
        header = {"type": "spectrum", "session": reader.session_id, **calib,
                  **{c: table[c][r].tolist() for c in ("point_index", "frame_index", "x_nm", "y_nm",
                                                        "energy_offset_meV", "t")}}
        yield Message(header, block[sel])


def map_rows(path: str | Path, points: Sequence[int], params: Params, energy_meV: np.ndarray | None
             ) -> EELSPoints:
    """Worker task: the EELS stage's per-point step over ``points`` (whole runs of its blocks, in arrival
    order) of the session at ``path``.

    ``energy_meV`` is the map's common axis (None: this task holds the session's first run, which fixes it).
    Returns the stage's per-point state (:class:`~stemlive.live.pipeline.eels_stage.EELSPoints`) for :func:`analyze_map`
    to merge.  The per-point results are not returned: the stage's final step rewrites them whole.
    """
    from stemlive.live.analysis._malloc import heap_reuse
    from stemlive.live.analysis._threads import limit_threads

    with heap_reuse(), SessionReader(path) as reader:
        stage = _eels_stage(params, Message(dict(reader.start_header), None))
        stage.params = {**stage.params, "labels_every": 0}  # the live segmentation refresh is not per-row work
        stage.use_energy_axis(energy_meV)
        # one analysis thread per worker process: the cluster already runs one task per core
        with limit_threads(1):
            for msg in _point_messages(reader, points):
                for _ in stage.process(msg):
                    pass
            for _ in stage.flush():
                pass
    return stage.points()


def _chunks(runs: list[list[int]], per_task: int) -> list[list[int]]:
    """Whole runs of positions into tasks of about ``per_task`` positions."""
    tasks: list[list[int]] = []
    for run in runs:
        if not tasks or len(tasks[-1]) + len(run) > per_task:
            tasks.append([])
        tasks[-1].extend(run)
    return tasks


def analyze_map(path: str | Path, out_path: str | Path, params: Params, client: Any, *,
                rows_per_task: int = 8) -> Path:
    """Analyse an EELS map split by rows of positions on ``client``'s cluster into ``out_path``."""
    path, out_path = Path(path), Path(out_path)
    with SessionReader(path) as reader:
        order = reader.spectrum_table()["point_index"]
        first_seen = np.unique(order, return_index=True)[1]
        points = order[np.sort(first_seen)]  # arrival order: the first run fixes the axis
        shape = reader.settings.get("scan_shape")
        stage = _eels_stage(params, Message(dict(reader.start_header), None))
    if not len(points):
        from stemlive.live.pipeline.replay import replay_analyze

        return replay_analyze(path, out_path, params)
    runs = stage.runs([int(p) for p in points])
    nx = int(shape[1]) if shape else max(1, len(points))
    head = client.submit(map_rows, str(path), runs[0], params, None, pure=False)
    energy = head.result().energy_meV
    tasks = _chunks(runs[1:], max(1, int(rows_per_task)) * nx)
    futures = [head] + [client.submit(map_rows, str(path), t, params, energy, pure=False) for t in tasks]
    return _finish_map(path, out_path, params, futures, client)


def _finish_map(path: Path, out_path: Path, params: Params, futures: list[Any], client: Any) -> Path:
    """Record the session into ``out_path`` (while the workers compute) and finish the EELS stage on the merged
    per-point state of the workers' parts (merged in the session's order, as in-process)."""
    status, message = "aborted", ""
    with SessionReader(path) as reader:
        msgs = reader.messages()
        start = next(msgs)
        run = SessionRun(start, out_path, params)
        try:
            for msg in msgs:
                if msg.type == "session_end":
                    status = str(msg.header.get("status", "complete"))
                    message = str(msg.header.get("message", ""))
                    break
                run.record(msg)
                if msg.type != "spectrum":
                    run.analyze(msg)
            stage = next(s for s in run.stages if isinstance(s, EELSStage))
            for future in futures:
                stage.add_points(future.result())
                future.release()  # the worker's copy of the part is no longer needed
            # as analyze_messages: a recording that never got its session_end is finished as aborted
            run.finish(status, message=message or ("" if status != "aborted" else "source session was not closed"))
        except BaseException:
            if not run.closed:
                run.finish("failed", message="batch analysis failed")
            raise
    return out_path


# --------------------------------------------------------------------------------------------- sessions
def _whole_session(path: str, out_path: str, params: Params) -> str:
    from stemlive.live.analysis._malloc import heap_reuse
    from stemlive.live.pipeline.replay import replay_analyze

    with heap_reuse():
        return str(replay_analyze(path, out_path, params))


def analyze_files(paths: Sequence[str | Path], out_dir: str | Path, params: Params, *,
                  scheduler: str | None = None, client: Any = None, rows_per_task: int = 8,
                  n_workers: int = DEFAULT_WORKERS) -> list[Path]:
    """Analyse session files on a Dask cluster into ``out_dir`` (one output file per input, same name).

    Maps (``eels_map``) are split by rows of positions (:func:`analyze_map`); other sessions are one task each.
    """
    out_dir = Path(out_dir)
    kinds = []
    for p in paths:  # unreadable input fails here, before any cluster or output exists
        with SessionReader(p) as reader:
            kinds.append(reader.kind)
    outs = [output_path(p, out_dir) for p in paths]
    if len({o.name for o in outs}) != len(outs):
        raise ValueError("two input sessions have the same file name; their outputs would collide")
    out_dir.mkdir(parents=True, exist_ok=True)
    close: Callable[[], None] | None = None
    if client is None:
        client, close = open_client(scheduler, n_workers)
    try:
        singles = {i: client.submit(_whole_session, str(p), str(o), params, pure=False)
                   for i, (p, o, k) in enumerate(zip(paths, outs, kinds, strict=True)) if k != "eels_map"}
        done: list[Path] = []
        for i, (p, o, k) in enumerate(zip(paths, outs, kinds, strict=True)):
            if k == "eels_map":
                done.append(analyze_map(p, o, params, client, rows_per_task=rows_per_task))
            else:
                done.append(Path(singles[i].result()))
        return done
    finally:
        if close is not None:
            close()
