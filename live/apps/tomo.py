"""``stemlive tomo export|reconstruct|atoms``: the command line of the tomography hand-off.

The public API of the hand-off is re-exported here (``stemlive.live.apps.tomo.export`` etc.): reading in
:mod:`.tomo_input`, the files in :mod:`.tomo_files`, export and reconstruction in :mod:`.tomo_pipeline`.
Conventions and file layouts: ``docs/tomography.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from stemlive.live.apps.tomo_files import (
    EMD_GROUP,
    EMD_GROUP_V1,
    VOLUME_AXES,
    astra_parallel3d_vec,
    read_emd_layout,
    read_emd_tilt_series,
    read_emd_volume,
    write_astra_vectors,
    write_emd,
    write_emd_volume,
    write_genfire_inputs,
)
from stemlive.live.apps.tomo_input import (
    ALPHA,
    ALPHA_CAL,
    BETA,
    BETA_CAL,
    SUMS,
    TiltSeries,
    TomoInputError,
    load_angles,
    read_tilt_series,
)
from stemlive.live.apps.tomo_pipeline import ALIGN_METHODS, export, reconstruct, save_slices_png

__all__ = [
    "ALIGN_METHODS",
    "ALPHA",
    "ALPHA_CAL",
    "BETA",
    "BETA_CAL",
    "EMD_GROUP",
    "EMD_GROUP_V1",
    "SUMS",
    "VOLUME_AXES",
    "TiltSeries",
    "TomoInputError",
    "add_subcommand",
    "astra_parallel3d_vec",
    "export",
    "load_angles",
    "read_emd_layout",
    "read_emd_tilt_series",
    "read_emd_volume",
    "read_tilt_series",
    "reconstruct",
    "save_slices_png",
    "write_astra_vectors",
    "write_emd",
    "write_emd_volume",
    "write_genfire_inputs",
]


# ---------------------------------------------------------------------------------------------- command line
def add_subcommand(subparsers: Any) -> None:
    """Register ``stemlive tomo export|reconstruct|atoms``."""
    p = subparsers.add_parser("tomo", help="tomography hand-off: export a tilt series, reference reconstruction")
    sub = p.add_subparsers(dest="tomo_command", metavar="ACTION", required=True)
    e = sub.add_parser("export", help="write the aligned per-tilt sums as Berkeley EMD and GENFIRE inputs")
    e.add_argument("session", type=Path, help="tilt-series session file (.h5) with /results/tilt_series/sums")
    e.add_argument("-o", "--out", type=Path, help="output folder (default: next to the session)")
    e.add_argument("--align", choices=("cross_correlation", "com", "none"), default="cross_correlation")
    e.add_argument("--angles", type=Path, help="calibrated angles: simulator truth JSON or two-column text")
    e.set_defaults(func=_cmd_export)
    r = sub.add_parser("reconstruct", help="reference SIRT reconstruction for double-tilt geometry (CPU)")
    r.add_argument("source", type=Path, help="exported .emd file or a tilt-series session file")
    r.add_argument("-o", "--out", type=Path, help="output folder (default: next to the source)")
    r.add_argument("--iterations", type=int, default=50)
    r.add_argument("--thickness", type=int, help="support along the beam in voxels (default: auto)")
    r.add_argument("--align", choices=("cross_correlation", "com", "none"), default="cross_correlation")
    r.add_argument("--angles", type=Path)
    r.add_argument("--window", type=int, help="scanning-window size in voxels (default: whole field)")
    r.add_argument("--step", type=int, help="scanning-window step in voxels")
    r.add_argument("--scheduler", help="Dask scheduler address for the windows, or 'local' for a 2-worker local "
                                       "cluster (default: windows in this process)")
    r.add_argument("--accelerate", action="store_true",
                   help="accelerated (FISTA) SIRT: much closer to convergence in the same iterations")
    r.add_argument("--no-png", action="store_true", help="do not save slice images")
    r.set_defaults(func=_cmd_reconstruct)
    from stemlive.live.apps import atoms  # ``tomo atoms``: calibrated angles and the 3D atomic model (issue 14)

    atoms.add_parser(sub)


def _default_out(path: Path, out: Path | None) -> Path:
    return out if out is not None else path.parent / f"{path.stem}_tomo"


def _check_source(path: Path) -> None:
    """Refuse a missing, empty, truncated or non-session input with the one-line errors of every command."""
    from stemlive.live.storage.session_contract import check_contract, open_session_file
    from stemlive.live.storage.session_reader import check_format

    with open_session_file(path) as f:
        if path.suffix.lower() != ".emd" or "format" in f.attrs:
            check_format(f)
            check_contract(f, path)


def _cmd_export(args: Any) -> int:
    from stemlive.live.exitcodes import CLIError, ExitCode

    _check_source(args.session)
    try:
        paths = export(args.session, _default_out(args.session, args.out), align=args.align, angles=args.angles)
    except TomoInputError as e:
        raise CLIError(str(e), ExitCode.BAD_INPUT) from None
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


def _cmd_reconstruct(args: Any) -> int:
    from stemlive.live.apps.console import show_progress
    from stemlive.live.exitcodes import CLIError, ExitCode

    for option, value in (("iterations", args.iterations), ("thickness", args.thickness), ("window", args.window),
                          ("step", args.step)):
        if value is not None and value < 1:
            raise CLIError(f"--{option} {value}: must be >= 1", ExitCode.USAGE)
    if args.step is not None and args.window is None:
        raise CLIError("--step needs --window (the scanning-window size)", ExitCode.USAGE)
    _check_source(args.source)
    client = cluster = None
    if args.scheduler:
        from dask.distributed import Client

        from stemlive.live.pipeline.batch import local_cluster

        try:
            if args.scheduler == "local":  # two worker processes on this machine, one thread each
                cluster = local_cluster(2)
                client = Client(cluster)
            else:
                client = Client(args.scheduler, timeout=30)
        except (OSError, TimeoutError) as e:
            if cluster is not None:
                cluster.close()
            raise CLIError(f"Dask scheduler {args.scheduler}: {e}", ExitCode.FAILED) from None

    bar = show_progress(args, sys.stdout)  # carriage returns only on a terminal

    def progress(i: int, n: int, err: float) -> None:
        if bar:
            print(f"\r  iteration {i}/{n}, residual {err:.3g}", end="" if i < n else "\n", flush=True)

    try:
        paths = reconstruct(
            args.source, _default_out(args.source, args.out), n_iter=args.iterations, thickness_px=args.thickness,
            align=args.align, angles=args.angles, window=args.window, step=args.step, client=client,
            png=not args.no_png, progress=progress, accelerate=args.accelerate,
        )
    except TomoInputError as e:
        raise CLIError(str(e), ExitCode.BAD_INPUT) from None
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0
