"""The simulated devices' access to the stemlive physics: :class:`PhysicsBackend`, one small method per call, so
the device code stays free of physics and tests can swap in a stub (anything satisfying :class:`PhysicsLike`)."""

from __future__ import annotations

import typing
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = ["PhysicsBackend", "PhysicsLike", "resolve_scenario"]

_DEFAULT_EELS = {"n_channels": 2048, "dispersion_meV": 0.44, "energy_offset_meV": -20.0, "exposure_ms": 300.0}


def resolve_scenario(scenario: Any) -> Any:
    """Return a ``Scenario``: load a built-in name or path, or pass a scenario object through."""
    if isinstance(scenario, str):
        from stemlive.simulators.scenario import load_scenario

        return load_scenario(scenario)
    return scenario



class PhysicsLike(Protocol):
    """What the devices need from the physics (see :class:`PhysicsBackend`)."""

    ground_truth: Any

    def settle_time_s(self) -> float: ...

    def move_tilt(self, alpha_nominal_deg: float, beta_nominal_deg: float, t_s: float) -> Any: ...

    def actual_tilt_deg(self, t_s: float) -> tuple[float, float]: ...

    def field_shift_nm(self, t_s: float) -> tuple[float, float]: ...

    def render_haadf(self, *, alpha_deg: float, beta_deg: float, shape: tuple[int, int], fov_nm: float,
                     dwell_us: float, center_nm: tuple[float, float], rotation_rad: float,
                     t_start_s: float) -> tuple[NDArray[np.float32], Any]: ...

    def eels_spectra(self, *, x_nm: float | NDArray[Any], y_nm: float | NDArray[Any], exposure_ms: float,
                     n_channels: int, dispersion_meV: float, energy_offset_meV: float,
                     t_s: float | NDArray[Any]) -> tuple[NDArray[np.float32], Any]: ...

    def eels_settings(self) -> dict[str, float]: ...

    def beam_current_A(self) -> float: ...


class PhysicsBackend:
    """The stemlive physics behind the devices; every physics call is one small method here.

    Parameters
    ----------
    scenario
        A ``stemlive.simulators.scenario.Scenario``.
    """

    def __init__(self, scenario: Any) -> None:
        from stemlive.simulators.stage import StageModel
        from stemlive.simulators.truth import GroundTruth

        self.scenario = scenario
        self._rng = np.random.default_rng(getattr(scenario, "seed", 0))
        self.stage = StageModel(scenario.stage, seed=scenario.stage_seed)
        self._haadf: Any = None
        self._eels: Any = None
        self.ground_truth = GroundTruth(scenario=scenario.name, seed=scenario.seed)

    # built lazily so that a missing or slow module only affects the feature that needs it
    @property
    def haadf(self) -> Any:
        """The ``HAADFSimulator``."""
        if self._haadf is None:
            from stemlive.simulators.haadf import HAADFSimulator

            self._haadf = HAADFSimulator(self.scenario)
        return self._haadf

    @property
    def eels(self) -> Any:
        """The ``VibrationalEELSSimulator``."""
        if self._eels is None:
            from stemlive.simulators.eels_model import VibrationalEELSSimulator

            self._eels = VibrationalEELSSimulator(self.scenario, seed=getattr(self.scenario, "seed", 0))
        return self._eels

    def settle_time_s(self) -> float:
        """Settling time of a stage move, in simulated seconds."""
        return float(self.scenario.stage.settle_time_s)

    def move_tilt(self, alpha_nominal_deg: float, beta_nominal_deg: float, t_s: float) -> Any:
        """Command nominal angles on the stage model; return its ``TiltState`` (raises ValueError beyond limits)."""
        return self.stage.move_to(alpha_nominal_deg, beta_nominal_deg, t_s=t_s)

    def actual_tilt_deg(self, t_s: float) -> tuple[float, float]:
        """Actual (alpha, beta) in degrees at ``t_s``, including the settling transient."""
        a, b = self.stage.actual_angles_deg(t_s)
        return float(a), float(b)

    def field_shift_nm(self, t_s: float) -> tuple[float, float]:
        """Non-eucentric (dy, dx) shift of the field of view, in nm, at ``t_s``."""
        dy, dx = self.stage.fov_shift_nm(t_s)
        return float(dy), float(dx)

    def render_haadf(self, *, alpha_deg: float, beta_deg: float, shape: tuple[int, int], fov_nm: float,
                     dwell_us: float, center_nm: tuple[float, float], rotation_rad: float,
                     t_start_s: float) -> tuple[NDArray[np.float32], Any]:
        """Render one HAADF frame at actual angles; return (image, FrameTruth)."""
        return typing.cast(tuple[NDArray[np.float32], Any], self.haadf.render_frame(
            alpha_deg=alpha_deg, beta_deg=beta_deg, shape=shape, fov_nm=fov_nm, dwell_us=dwell_us,
            center_nm=center_nm, rotation_rad=rotation_rad, t_start_s=t_start_s, rng=self._rng))

    def eels_spectra(self, *, x_nm: Any, y_nm: Any, exposure_ms: float, n_channels: int,
                     dispersion_meV: float, energy_offset_meV: float, t_s: Any) -> tuple[NDArray[np.float32], Any]:
        """Spectra (k, n_channels) at probe positions / times (broadcast to k); return (counts, truths)."""
        return typing.cast(tuple[NDArray[np.float32], Any], self.eels.spectra(
            x_nm=x_nm, y_nm=y_nm, exposure_ms=exposure_ms, n_channels=n_channels, dispersion_meV=dispersion_meV,
            energy_offset_meV=energy_offset_meV, t_s=t_s))

    def eels_settings(self) -> dict[str, float]:
        """Spectrometer defaults (n_channels, dispersion_meV, energy_offset_meV, exposure_ms) from the scenario."""
        from stemlive.simulators.eels_physics import eels_config

        cfg = eels_config(self.scenario)
        return {key: float(cfg.get(key, default)) for key, default in _DEFAULT_EELS.items()}

    def beam_current_A(self) -> float:
        """Probe current (A) of the HAADF settings."""
        return float(self.scenario.haadf.beam_current_pA) * 1e-12
