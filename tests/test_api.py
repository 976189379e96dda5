"""The notebook API (``import stemlive``): the executable page docs/notebook.md, and the package layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import export_sessions as es  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "notebook.md"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_notebook_page_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("exspy")
    session = es.eels_line_session(tmp_path / "line.h5")
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    namespace: dict[str, object] = {"SESSION": str(session), "__name__": "__notebook__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)  # noqa: S102
            except Exception as e:  # name the block that failed
                raise AssertionError(f"docs/notebook.md block {i} failed: {e!r}\n{block}") from e
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "(4, 8, 2048) float32" in out
    assert (tmp_path / "line.hspy").exists() and (tmp_path / "reanalysed.h5").exists()


def test_top_level_api_imports_without_qt_or_swift() -> None:
    code = ("import sys, stemlive; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'zmq', 'nion', 'nionswift_plugin')]; "
            "print(stemlive.__file__, sorted(stemlive.__all__), bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path, *_ = done.stdout.split()
    assert path.endswith("__init__.py")  # a regular package, not the namespace
    assert done.stdout.rstrip().endswith("[]"), done.stdout
    for name in ("load", "align_and_sum", "temperature_map", "segment", "analyze", "export"):
        assert f"'{name}'" in done.stdout


def test_import_of_the_cli_stays_light_and_every_name_resolves() -> None:
    code = ("import sys, stemlive.live.apps.cli; heavy = [m for m in ('scipy', 'stemlive.live.apps.api', 'hyperspy') "
            "if m in sys.modules]; import stemlive; names = [n for n in stemlive.__all__ if getattr(stemlive, n) "
            "is None]; print(heavy, names, sorted(stemlive._WHERE) == sorted(set(stemlive.__all__) - {'__version__'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "[]", "True"], done.stdout  # the API loads on first use only


def test_functions_take_arrays_and_signals_alike() -> None:
    import stemlive

    hs = pytest.importorskip("hyperspy.api")
    from stemlive.simulators.eels_model import VibrationalEELSSimulator

    sim = VibrationalEELSSimulator("aln_sic", seed=2)
    frames, _ = sim.spectra(x_nm=np.full((2, 6), 3.0), t_s=np.arange(12.0).reshape(2, 6), energy_offset_meV=-300.0)
    energy, sums, _ = stemlive.align_and_sum(frames, dispersion_meV=0.44, energy_offset_meV=-300.0)
    s = hs.signals.Signal1D(frames)
    s.axes_manager.signal_axes[0].units = "meV"
    s.axes_manager.signal_axes[0].offset = -300.0
    s.axes_manager.signal_axes[0].scale = 0.44
    s.axes_manager.navigation_axes[1].name = "position"  # numpy axis 0; navigation_axes[0] = frames (axis 1)
    summed = stemlive.align_and_sum(s)
    assert [a.name for a in summed.axes_manager.navigation_axes] == ["position"]
    assert summed.axes_manager.navigation_shape == (2,)
    np.testing.assert_array_equal(summed.data, sums)
    np.testing.assert_allclose(summed.axes_manager.signal_axes[0].axis, energy, atol=1e-9)
    t, err = stemlive.temperature_map(sums, energy)
    ts = stemlive.temperature_map(summed)
    np.testing.assert_allclose(ts.data, t)
    np.testing.assert_allclose(ts.metadata.Signal.Noise_properties.variance.data, err**2)
    with pytest.raises(ValueError, match="energy_meV"):
        stemlive.temperature_map(sums)
