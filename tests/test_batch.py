"""Batch analysis on a Dask cluster (live/pipeline/batch.py): identical results to the in-process replay."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from commands import STEMLIVE
from corpus import generator, scenarios

from stemlive.live.exitcodes import ExitCode
from stemlive.live.pipeline import batch
from stemlive.live.pipeline.registry import make_params
from stemlive.live.pipeline.replay import replay_analyze
from stemlive.live.pipeline.run import analyze_messages


def _results(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f["results"].visititems(lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset)
                                else None)
    return out


def _assert_identical(a: Path, b: Path) -> None:
    ra, rb = _results(a), _results(b)
    assert sorted(ra) == sorted(rb)
    for name in ra:
        x, y = ra[name], rb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.names is None and x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=name)  # NaN == NaN here
        else:
            assert x.tolist() == y.tolist(), name  # (variable-length strings: not by bytes)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-material 4x6 map (2 frames per point) and a short line, recorded from the corpus generator."""
    d = tmp_path_factory.mktemp("raw")
    out = {}
    specs = {"map": scenarios.material_map("map", 2, shape=(4, 6), counts=1e8, frames=2),
             "line": scenarios.uniform_line("line", scenarios.instrument(), counts=2e8, frames=2, n_points=8),
             # two materials under symmetric power-law zero-loss tails: the tail shape pooled over the whole map
             "tails": scenarios.material_map("tails", 2, scenarios.instrument(
                 background=generator.Background(2e-4, 3.0)), shape=(3, 4), counts=2e8, frames=2)}
    for name, sc in specs.items():
        # record the raw session (no analysis stages) as an acquisition would
        out[name] = analyze_messages(sc.messages(), d / f"{name}.h5", make_params(), stage_classes={})
    return out


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    c, close = batch.open_client(n_workers=2)
    yield c
    close()


@pytest.mark.parametrize(("name", "rows_per_task"), [("map", 2), ("tails", 1)])
def test_map_split_by_rows_identical_to_in_process(name: str, rows_per_task: int, sessions: dict[str, Path],
                                                   client: object, tmp_path: Path) -> None:
    """Datasets and the temperatures' attributes identical.  "tails": each worker's rows keep their m profiles and
    the merged stage pools them over the map (the shared tail shape) as the session would."""
    params = make_params(overrides=["eels.n_peaks=2"])
    ref = replay_analyze(sessions[name], tmp_path / "ref.h5", params)
    out = batch.analyze_map(sessions[name], tmp_path / "batch.h5", params, client, rows_per_task=rows_per_task)
    _assert_identical(ref, out)
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        attrs = dict(a["results/eels/temperature_K"].attrs)
        assert attrs == dict(b["results/eels/temperature_K"].attrs)
    assert np.isfinite(_results(out)["eels/temperature_K"]).all()
    if name == "tails":
        assert attrs["zlp_shape_spectra"] == 12 and abs(attrs["zlp_m"] - 2.5) < 0.1, attrs


def test_cli_many_sessions_into_a_folder(sessions: dict[str, Path], tmp_path: Path) -> None:
    """As a user types it: two sessions into OUTDIR on a local 2-worker cluster; the outputs equal the
    single-file form's; the exit code is 0 (or 4, INCOMPLETE, with one line per missing result)."""
    out_dir = tmp_path / "out"
    cmd = [*STEMLIVE, "replay", str(sessions["map"]), str(sessions["line"]),
           "--analyze", str(out_dir), "--set", "eels.n_peaks=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode in (0, 4), proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("analysed 2 sessions"), proc.stdout
    for name in ("map", "line"):
        single = tmp_path / f"{name}_single.h5"
        cmd = [*STEMLIVE, "replay", str(sessions[name]), "--analyze", str(single),
               "--set", "eels.n_peaks=2"]
        single_proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        assert single_proc.returncode in (0, 4), single_proc.stderr
        _assert_identical(single, out_dir / f"{name}.h5")


def test_cli_existing_scheduler(sessions: dict[str, Path], client: object, tmp_path: Path) -> None:
    """``--scheduler ADDRESS`` uses an existing cluster (here: this test's local one) and leaves it running."""
    address = client.scheduler.address  # type: ignore[attr-defined]
    out_dir = tmp_path / "out"
    cmd = [*STEMLIVE, "replay", str(sessions["line"]), "--analyze", str(out_dir),
           "--scheduler", address, "--set", "eels.n_peaks=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode in (0, 4), proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"analysed 1 sessions into {out_dir}"
    ref = replay_analyze(sessions["line"], tmp_path / "ref.h5", make_params(overrides=["eels.n_peaks=2"]))
    _assert_identical(ref, out_dir / "line.h5")
    assert client.submit(sum, [1, 2]).result() == 3  # type: ignore[attr-defined]


def test_cli_missing_input_fails_before_any_cluster(sessions: dict[str, Path], tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    cmd = [*STEMLIVE, "replay", str(sessions["line"]),
           str(tmp_path / "missing.h5"),
           "--analyze", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.h5" in lines[0], proc.stderr
    assert not out_dir.exists()


def test_map_rows_fitted_together_agree_with_one_spectrum_at_a_time(tmp_path: Path) -> None:
    """The EELS stage fits the temperatures of a map's scan row together (``eels.temperature_block``, default one
    row: ~40x less work per spectrum than one at a time); on the corpus's 96-pixel two-material map (rows of 12
    pixels, half of each material, 60 K across x) every pixel's temperature stays within 0.1 sigma of fitting
    its spectrum alone, 0.05 sigma RMS, errors within 1 % (measured with the zero-loss fit's tol 3e-6: 0.007,
    0.001 sigma, errors equal; with the former 3e-5 0.18 / 0.043 sigma: where the fit stops within its tolerance)."""
    sc = scenarios.by_name("map2")
    temps = {}
    for block in ("null", "1"):
        params = make_params(overrides=["eels.k=2", "eels.labels_every=0", f"eels.temperature_block={block}"])
        res = _results(analyze_messages(sc.messages(), tmp_path / f"{block}.h5", params))
        temps[block] = (res["eels/temperature_K"], res["eels/temperature_err_K"])
    (t_row, e_row), (t_one, e_one) = temps["null"], temps["1"]
    assert np.isfinite(t_one).all() and np.isfinite(t_row).all()
    z = np.abs(t_row - t_one) / e_one
    summary = f"max {z.max():.3f} sigma, RMS {np.sqrt(np.mean(z**2)):.3f}"
    assert z.max() <= 0.1 and np.sqrt(np.mean(z**2)) <= 0.05, summary
    np.testing.assert_allclose(e_row, e_one, rtol=0.01)


_PAGE_FAULTS = """
import resource, sys
import numpy as np
from stemlive.live.analysis._malloc import fixed_trim_threshold, heap_reuse

def faults(n=200):
    np.ones(1 << 17).sum()  # 1 MiB, once, so that the heap can hold it
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        np.ones(1 << 17).sum()  # a 1 MiB temporary, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

outside = faults()
with heap_reuse():
    inside = faults()
after = faults()
print(fixed_trim_threshold(), outside, inside, after)
"""


@pytest.mark.parametrize("trim", [None, "65536"])
def test_heap_reuse_undoes_a_fixed_trim_threshold(trim: str | None) -> None:
    """With Dask's worker setting ``MALLOC_TRIM_THRESHOLD_=65536`` every 1 MiB numpy temporary is a fresh mmap (256
    page faults each); inside ``heap_reuse`` it is reused from the heap, and the setting is restored after."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    if trim is not None:
        env["MALLOC_TRIM_THRESHOLD_"] = trim
    proc = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    threshold, outside, inside, after = proc.stdout.split()
    assert int(inside) < 2_000  # 200 temporaries of 256 pages: at most a few pages each
    if trim is None:
        assert threshold == "None" and int(outside) < 2_000 and int(after) < 2_000
    else:
        assert threshold == trim and int(outside) > 200 * 200 and int(after) > 200 * 200


def test_local_cluster_workers_start_without_a_fixed_trim_threshold(client: object) -> None:
    from stemlive.live.analysis._malloc import fixed_trim_threshold

    assert set(client.run(fixed_trim_threshold).values()) == {None}  # type: ignore[attr-defined]
