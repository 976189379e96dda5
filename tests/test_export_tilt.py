"""``stemlive export`` of tilt series, read back with the real third-party readers: Tomviz's own EMD reader
(tomviz-pipeline ``load_dataset``), HyperSpy, ncempy and GENFIRE (which reconstructs a blob phantom)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest

from stemlive.live.analysis import reconstruct as rc
from stemlive.live.apps import tomo
from stemlive.live.storage import export

sys.path.insert(0, str(Path(__file__).parent))
import export_sessions as es  # noqa: E402
from commands import STEMLIVE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NY, NX = 32, 40  # not square: a swapped axis shows
SIGMA = 1.5
# single-axis series with uneven steps: a uniform axis cannot stand in for these angles
ALPHA_1 = np.array([-62.0, -47.5, -35.0, -21.0, -10.0, 0.0, 4.0, 15.5, 30.0, 48.0, 66.0])


def _blobs(seed: int = 1, m: int = 10, spread: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-spread, spread, (m, 3)), rng.uniform(0.5, 1.5, m)


def _session(path: Path, alpha: np.ndarray, beta: np.ndarray, shape_yx: tuple[int, int] = (NY, NX)) -> Path:
    pos, amp = _blobs()
    proj = np.stack([es.blob_projection(pos, amp, r, shape_yx, SIGMA) for r in rc.stage_rotation(alpha, beta)])
    return es.tilt_session(path, proj, alpha, beta)


@pytest.fixture(scope="module")
def single_axis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tilt1")
    session = _session(d / "single.h5", ALPHA_1, np.zeros_like(ALPHA_1))
    return session, export.export(session, d / "single.emd", "emd", align="none")["emd"]


def test_tomviz_reader_opens_the_tilt_series_with_the_real_angles(single_axis: tuple[Path, Path]) -> None:
    from tomviz_pipeline.io.emd import load_dataset

    session, emd = single_axis
    ds = load_dataset(emd)
    np.testing.assert_allclose(ds.tilt_angles, ALPHA_1, atol=1e-5)  # Tomviz stores dims as float32
    assert ds.tilt_axis == 2
    data = ds.active_scalars
    assert data.shape == (NY, NX, len(ALPHA_1))  # Tomviz (X, Y, angle): X is image y, the alpha axis
    with h5py.File(session, "r") as f:
        sums = f["results/tilt_series/sums"][()]
    for k in range(len(ALPHA_1)):
        np.testing.assert_array_equal(data[:, :, k], sums[k])  # align="none": the sums themselves
    assert ds.spacing[:2] == pytest.approx([0.05, 0.05], rel=1e-6)
    # physics, read through Tomviz: one blob off-axis; a rotation about the tilt axis keeps its coordinate
    # along Tomviz's X (the tilt axis) and moves it along Y
    pos, amp = np.array([[6.0, -5.0, 3.0]]), np.array([1.0])
    rots = rc.stage_rotation(ALPHA_1, 0 * ALPHA_1)
    one = np.stack([es.blob_projection(pos, amp, r, (NY, NX), SIGMA) for r in rots])
    path = es.tilt_session(emd.with_name("one.h5"), one, ALPHA_1, 0 * ALPHA_1)
    data = load_dataset(export.export(path, emd.with_name("one.emd"), "emd", align="none")["emd"]).active_scalars
    along_x = [float(np.sum(data[:, :, k].sum(axis=1) * np.arange(NY)) / data[:, :, k].sum()) for k in range(11)]
    along_y = [float(np.sum(data[:, :, k].sum(axis=0) * np.arange(NX)) / data[:, :, k].sum()) for k in range(11)]
    np.testing.assert_allclose(along_x, NY // 2 - 5.0, atol=1e-3)
    assert np.ptp(along_y) > 5


def test_hyperspy_reads_the_real_angles_from_the_emd_and_the_hspy(single_axis: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    hs = pytest.importorskip("hyperspy.api")
    session, emd = single_axis
    s = hs.load(emd, file_format="hspy")  # the HyperSpy layout inside the exported EMD
    nav = s.axes_manager.navigation_axes[0]
    assert (nav.name, nav.units) == ("alpha", "deg")
    np.testing.assert_array_equal(nav.axis, ALPHA_1)
    y, x = s.axes_manager.signal_axes[1], s.axes_manager.signal_axes[0]
    assert (y.name, y.size, x.name, x.size, x.units) == ("y", NY, "x", NX, "nm")
    assert x.scale == pytest.approx(0.05)
    np.testing.assert_array_equal(s.metadata.stemlive.beta_deg, np.zeros_like(ALPHA_1))
    hspy = export.export(session, tmp_path / "single", "hspy", align="none")["hspy"]
    assert hspy.suffix == ".hspy"
    s2 = hs.load(hspy)
    np.testing.assert_array_equal(s2.axes_manager.navigation_axes[0].axis, ALPHA_1)
    np.testing.assert_array_equal(s2.data, s.data)
    with h5py.File(session, "r") as f:
        np.testing.assert_array_equal(s2.data, f["results/tilt_series/sums"][()])


def test_double_tilt_keeps_both_angles_and_the_raw_frames(tmp_path: Path) -> None:
    hs = pytest.importorskip("hyperspy.api")
    import ncempy.io

    alpha = np.array([0.0, -14.3, -14.3, 20.1, 20.1, 12.6])  # rows of the reference table: alpha repeats
    beta = np.array([0.0, -22.9, 17.1, 17.1, -20.1, -12.6])
    session = _session(tmp_path / "double.h5", alpha, beta, (24, 24))
    emd = export.export(session, tmp_path / "double.emd", "emd", align="none")["emd"]
    s = hs.load(emd, file_format="hspy")
    assert s.axes_manager.navigation_axes[0].name == "projection"  # two angles per projection
    np.testing.assert_array_equal(s.metadata.stemlive.alpha_deg, alpha)
    np.testing.assert_array_equal(s.metadata.stemlive.beta_deg, beta)
    d = ncempy.io.read(emd)
    assert d["data"].shape == (6, 24, 24)
    with h5py.File(emd, "r") as f, h5py.File(session, "r") as src:
        g = f["data/tomography"]
        assert g["dim1"].dtype == np.float32 and g["dim2"].dtype == np.float32
        np.testing.assert_allclose(g["rotation_matrices"][()], rc.stage_rotation(alpha, beta))
        np.testing.assert_allclose(g["euler_zyz_deg"][()], rc.stage_to_genfire_euler(alpha, beta))
        raw = f["stemlive/raw"]
        np.testing.assert_array_equal(raw["frames"][()], src["tilt_series/frames"][()])  # bit for bit
        for name in ("tilt_index", "frame_index", "alpha_deg", "beta_deg", "t"):
            np.testing.assert_array_equal(raw[name][()], src[f"tilt_series/{name}"][()])


def test_rotation_matrices_and_astra_vectors_project_like_the_model() -> None:
    """Points projected with the stored ASTRA ``parallel3d_vec`` geometry (ASTRA's volume and detector
    conventions) land on the pixels of our model ``(R p)_xy + n // 2``, for even and odd sizes."""
    alpha = np.array([0.0, -14.3, 20.1, 12.6, -60.0])
    beta = np.array([0.0, 17.1, -20.1, 12.6, 5.0])
    rots = rc.stage_rotation(alpha, beta)
    np.testing.assert_allclose(rots @ np.swapaxes(rots, 1, 2), np.broadcast_to(np.eye(3), rots.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rots), 1.0)
    rng = np.random.default_rng(0)
    for shape in ((32, 24, 40), (31, 25, 41)):
        nz, ny, nx = shape
        vec = tomo.astra_parallel3d_vec(rots, shape)
        idx = rng.integers(0, [nx, ny, nz], (50, 3)).astype(float)  # voxel (ix, iy, iz)
        astra_xyz = idx - (np.array([nx, ny, nz]) - 1) / 2  # ASTRA: volume centred on the origin
        ours = idx - np.array([nx // 2, ny // 2, nz // 2])
        for k, r in enumerate(rots):
            ray, d, u, v = vec[k, :3], vec[k, 3:6], vec[k, 6:9], vec[k, 9:]
            # the detector point hit by the ray through p: p + t ray = d + a u + b v (u, v, ray orthonormal)
            a = (astra_xyz - d) @ u
            b = (astra_xyz - d) @ v
            col, row = a + (nx - 1) / 2, b + (ny - 1) / 2
            lab = ours @ r.T
            np.testing.assert_allclose(col, lab[:, 0] + nx // 2, atol=1e-9)
            np.testing.assert_allclose(row, lab[:, 1] + ny // 2, atol=1e-9)
            np.testing.assert_allclose(np.cross(u, v), ray, atol=1e-12)


def test_reconstruction_emd_is_in_tomviz_axis_order(tmp_path: Path) -> None:
    from tomviz_pipeline.io.emd import load_dataset

    vol = np.random.default_rng(2).random((6, 8, 10)).astype(np.float32)  # (z, y, x)
    path = tomo.write_emd_volume(tmp_path / "v.emd", vol, 0.25)
    ds = load_dataset(path)
    assert ds.tilt_angles is None
    # Tomviz (X, Y, Z) = our (y, z, x): the frame of Tomviz's own reconstructions from the exported tilt series
    np.testing.assert_array_equal(ds.active_scalars, vol.transpose(1, 0, 2))
    assert ds.spacing == pytest.approx([0.25] * 3)
    back, voxel = tomo.read_emd_volume(path)
    np.testing.assert_array_equal(back, vol)
    assert voxel == 0.25


def _import_genfire() -> types.ModuleType:
    """GENFIRE 1.1.11's package ``__init__`` imports its PyQt5 GUI; the reconstruction modules need no Qt, so
    the package is entered without running ``__init__`` (and matplotlib kept on Agg: it asks for Qt5Agg)."""
    spec = importlib.util.find_spec("genfire")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("genfire is not installed")
    if "genfire.reconstruct" not in sys.modules:
        pkg = types.ModuleType("genfire")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["genfire"] = pkg
        import matplotlib

        use = matplotlib.use
        matplotlib.use = lambda *args, **kwargs: None  # type: ignore[assignment]  # GENFIRE asks for Qt5Agg
        try:
            import genfire.fileio
            import genfire.reconstruct
            import genfire.utility  # noqa: F401
        finally:
            matplotlib.use = use
    return sys.modules["genfire"]


def test_genfire_reconstructs_a_blob_phantom_from_the_export(tmp_path: Path) -> None:
    genfire = _import_genfire()
    n = 32
    pos, amp = _blobs(seed=1, m=12)
    truth = es.render_volume(pos, amp, (n, n, n), SIGMA)
    alpha = np.concatenate([np.arange(-70.0, 71.0, 5.0), np.arange(-70.0, 71.0, 10.0)])
    beta = np.concatenate([np.zeros(29), np.full(15, 35.0)])
    proj = np.stack([es.blob_projection(pos, amp, r, (n, n), SIGMA) for r in rc.stage_rotation(alpha, beta)])
    session = es.tilt_session(tmp_path / "phantom.h5", proj, alpha, beta)
    paths = tomo.export(session, tmp_path / "out", align="none")
    projections = genfire.fileio.loadProjections(str(paths["genfire_projections"]))
    angles = genfire.fileio.loadAngles(str(paths["genfire_angles"]))
    emd = export.export(session, tmp_path / "phantom.emd", "emd", align="none")["emd"]
    with h5py.File(emd, "r") as f:  # the EMD carries the same GENFIRE angles
        np.testing.assert_allclose(f["data/tomography/euler_zyz_deg"][()], angles, atol=1e-5)
    rec = genfire.reconstruct.GenfireReconstructor(
        projections, angles, numIterations=20, oversamplingRatio=3, interpolationCutoffDistance=0.5,
        calculateRfree=False, verbose=False, resultsFilename=str(tmp_path / "rec.mrc"),
    ).reconstruct()
    volume = np.asarray(rec["reconstruction"])
    r = rc.pearson(volume.transpose(2, 0, 1), truth)  # GENFIRE V[g0, g1, g2] = f(y, x, z), docs/tomography.md
    assert r >= 0.95, r
    assert rc.pearson(volume, truth) < 0.6  # the orientation matters: a wrong one fails


def test_cli_exports_a_tilt_series(single_axis: tuple[Path, Path], tmp_path: Path) -> None:
    session, _ = single_axis
    out = tmp_path / "cli.emd"
    done = subprocess.run([*STEMLIVE, "export", str(session), "--format", "emd",
                           "-o", str(out), "--align", "none"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"emd: {out}"
    assert tomo.read_emd_layout(out)["projections"].shape == (len(ALPHA_1), NY, NX)
