"""Simulator scenarios: every knob of the simulated instrument in one JSON file.

A scenario file is a JSON object with the top-level keys

``name`` (str), ``description`` (str, optional), ``seed`` (int), ``time_scale`` (float, 1.0 = real time,
N = N times faster, 0 = as fast as possible), and the sections ``sample`` (the
:class:`~stemlive.simulators.sample.Heterojunction` parameters), ``haadf`` (:class:`HAADFParams`), ``drift``
(:class:`DriftParams`), ``stage`` (:class:`StageParams`) and ``eels`` (a plain dict, passed through untouched to
the EELS model). Every section is optional; missing keys take the dataclass defaults. Unknown keys and
out-of-range values raise :class:`ScenarioError` naming the offending key.

Built-in scenarios live in ``simulators/scenarios/<name>.json`` (package data) and are loaded with
``load_scenario("default")``; anything else is treated as a path.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from stemlive.simulators.sample import Heterojunction

__all__ = [
    "DriftParams",
    "HAADFParams",
    "Scenario",
    "ScenarioError",
    "StageParams",
    "builtin_scenarios",
    "load_scenario",
]


class ScenarioError(ValueError):
    """A scenario file or dict is malformed: unknown key, wrong type or out-of-range value."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ScenarioError(f"{where}: {msg}")


@dataclass(frozen=True)
class HAADFParams:
    """HAADF detector, probe and default scan settings.

    Attributes
    ----------
    beam_current_pA : float
        Probe current; electrons per pixel = beam_current_pA * dwell_us / 0.1602 (424 at 17 pA, 4 us).
    collection_efficiency : float
        Fraction of the probe electrons a single reference atom (``reference_Z``, Mo) scatters onto the ADF
        detector when the probe sits on it (peak of the atom's image). Default 0.125 gives a Mo peak of
        ~53 counts/pixel and ~1,000 counts integrated over one Mo column image at 17 pA, 4 us, 0.32 A pixels.
    z_exponent : float
        Incoherent Z-contrast exponent: atom signal ~ Z**z_exponent.
    reference_Z : int
        Atomic number the efficiency refers to.
    background_efficiency : float
        Fraction of probe electrons scattered onto the detector everywhere (support, contamination).
    read_noise_counts : float
        Standard deviation of the Gaussian detector/ADC noise added after Poisson noise.
    probe_fwhm_A : float
        FWHM of the Gaussian probe intensity.
    fov_nm, dwell_us, shape_px, flyback_us
        Default scan settings (reference: 512 x 512 px, 0.32 A pixels -> 16.384 nm, 4 us, line flyback).
    """

    beam_current_pA: float = 17.0
    collection_efficiency: float = 0.125
    z_exponent: float = 1.7
    reference_Z: int = 42
    background_efficiency: float = 0.005
    read_noise_counts: float = 1.0
    probe_fwhm_A: float = 1.3
    fov_nm: float = 16.384
    dwell_us: float = 4.0
    shape_px: tuple[int, int] = (512, 512)
    flyback_us: float = 100.0

    def __post_init__(self) -> None:
        w = "haadf"
        _check(self.beam_current_pA >= 0, f"{w}.beam_current_pA", "must be >= 0")
        _check(0 <= self.collection_efficiency <= 1, f"{w}.collection_efficiency", "must be in [0, 1]")
        _check(0 <= self.background_efficiency <= 1, f"{w}.background_efficiency", "must be in [0, 1]")
        _check(0 < self.z_exponent <= 3, f"{w}.z_exponent", "must be in (0, 3]")
        _check(1 <= self.reference_Z <= 100, f"{w}.reference_Z", "must be an atomic number")
        _check(self.read_noise_counts >= 0, f"{w}.read_noise_counts", "must be >= 0")
        _check(self.probe_fwhm_A > 0, f"{w}.probe_fwhm_A", "must be > 0")
        _check(self.fov_nm > 0, f"{w}.fov_nm", "must be > 0")
        _check(self.dwell_us > 0, f"{w}.dwell_us", "must be > 0")
        _check(self.flyback_us >= 0, f"{w}.flyback_us", "must be >= 0")
        _check(len(self.shape_px) == 2 and min(self.shape_px) > 0, f"{w}.shape_px", "must be [ny, nx] > 0")


@dataclass(frozen=True)
class DriftParams:
    """Sample drift: linear velocity plus a smooth random walk (see :class:`stage.DriftModel`).

    Attributes
    ----------
    velocity_nm_per_s : tuple[float, float]
        (vy, vx) in the lab frame. Default ~0.4 px / 0.6 px per 1.1 s frame at 0.032 nm pixels.
    random_walk_nm_per_sqrt_s : float
        Per-axis standard deviation of the random-walk displacement after 1 s.
    knot_interval_s : float
        Spacing of the random-walk knots; the path is a C1 Catmull-Rom spline through them.
    seed : int | None
        None: derived from the scenario seed.
    """

    velocity_nm_per_s: tuple[float, float] = (0.012, 0.018)
    random_walk_nm_per_sqrt_s: float = 0.002
    knot_interval_s: float = 0.5
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(len(self.velocity_nm_per_s) == 2, "drift.velocity_nm_per_s", "must be [vy, vx]")
        _check(all(math.isfinite(v) for v in self.velocity_nm_per_s), "drift.velocity_nm_per_s", "must be finite")
        _check(self.random_walk_nm_per_sqrt_s >= 0, "drift.random_walk_nm_per_sqrt_s", "must be >= 0")
        _check(self.knot_interval_s > 0, "drift.knot_interval_s", "must be > 0")


@dataclass(frozen=True)
class StageParams:
    """Double-tilt stage imperfections (see :class:`stage.StageModel`).

    Attributes
    ----------
    hysteresis_deg : tuple[float, float]
        Backlash (alpha, beta): the actual angle is nominal + direction_of_last_move * hysteresis. The default
        reproduces the only directly comparable row of the reference table (0, 0 nominal -> Y 1.1, X -2.0 deg).
    random_deg : float
        Standard deviation of the reproducible random part added per move and axis.
    settle_time_s : float
        Time after a move until the stage is settled (the angle relaxes exponentially with tau = settle/5).
    eucentric_offset_nm : float
        Height of the sample above the eucentric point: the field shifts by offset * R[:2, 2] with tilt.
    limits_deg : tuple[float, float]
        Largest |alpha| and |beta| the holder reaches.
    seed : int | None
        None: derived from the scenario seed.
    """

    hysteresis_deg: tuple[float, float] = (1.1, 2.0)
    random_deg: float = 0.3
    settle_time_s: float = 2.0
    eucentric_offset_nm: float = 5.0
    limits_deg: tuple[float, float] = (35.0, 30.0)
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(len(self.hysteresis_deg) == 2 and min(self.hysteresis_deg) >= 0, "stage.hysteresis_deg",
               "must be [alpha, beta] >= 0")
        _check(self.random_deg >= 0, "stage.random_deg", "must be >= 0")
        _check(self.settle_time_s >= 0, "stage.settle_time_s", "must be >= 0")
        _check(math.isfinite(self.eucentric_offset_nm), "stage.eucentric_offset_nm", "must be finite")
        _check(len(self.limits_deg) == 2 and 0 < min(self.limits_deg) and max(self.limits_deg) <= 90,
               "stage.limits_deg", "must be [alpha_max, beta_max] in (0, 90]")


@dataclass(frozen=True)
class Scenario:
    """A complete simulator configuration (see the module docstring for the file format)."""

    name: str = "default"
    description: str = ""
    seed: int = 0
    time_scale: float = 0.0
    sample: Heterojunction = field(default_factory=Heterojunction)
    haadf: HAADFParams = field(default_factory=HAADFParams)
    drift: DriftParams = field(default_factory=DriftParams)
    stage: StageParams = field(default_factory=StageParams)
    eels: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.time_scale >= 0 and math.isfinite(self.time_scale), "time_scale", "must be >= 0 (0 = as fast "
               "as possible)")

    @property
    def drift_seed(self) -> int:
        """Seed of the drift random walk (explicit or scenario seed + 1)."""
        return self.drift.seed if self.drift.seed is not None else self.seed + 1

    @property
    def stage_seed(self) -> int:
        """Seed of the stage random part (explicit or scenario seed + 2)."""
        return self.stage.seed if self.stage.seed is not None else self.seed + 2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "scenario") -> Scenario:
        """Build and validate a scenario from a JSON-like mapping; raises :class:`ScenarioError`."""
        _check(isinstance(data, Mapping), where, "must be a JSON object")
        top = {"name", "description", "seed", "time_scale", "sample", "haadf", "drift", "stage", "eels"}
        unknown = sorted(set(data) - top)
        _check(not unknown, where, f"unknown key(s) {unknown}; valid keys: {sorted(top)}")
        seed = _coerce(data.get("seed", 0), int, f"{where}.seed")
        kwargs: dict[str, Any] = {"seed": seed}
        if "name" in data:
            kwargs["name"] = _coerce(data["name"], str, f"{where}.name")
        if "description" in data:
            kwargs["description"] = _coerce(data["description"], str, f"{where}.description")
        if "time_scale" in data:
            kwargs["time_scale"] = _coerce(data["time_scale"], float, f"{where}.time_scale")
        sample = dict(data.get("sample", {}))
        sample.setdefault("seed", seed)
        kwargs["sample"] = _section(Heterojunction, sample, "sample")
        kwargs["haadf"] = _section(HAADFParams, data.get("haadf", {}), "haadf")
        kwargs["drift"] = _section(DriftParams, data.get("drift", {}), "drift")
        kwargs["stage"] = _section(StageParams, data.get("stage", {}), "stage")
        eels = data.get("eels", {})
        _check(isinstance(eels, Mapping), f"{where}.eels", "must be a JSON object")
        kwargs["eels"] = dict(eels)
        try:
            return cls(**kwargs)
        except ScenarioError:
            raise
        except (TypeError, ValueError) as exc:
            raise ScenarioError(f"{where}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict that :meth:`from_dict` turns back into an equal scenario."""
        out: dict[str, Any] = {"name": self.name, "description": self.description, "seed": self.seed,
                               "time_scale": self.time_scale}
        for sec in ("sample", "haadf", "drift", "stage"):
            out[sec] = {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in dataclasses.asdict(getattr(self, sec)).items()}
        out["eels"] = dict(self.eels)
        return out

    def replace(self, **changes: Any) -> Scenario:
        """Copy with top-level fields replaced; sections may be given as dicts of field changes."""
        new: dict[str, Any] = {}
        for key, value in changes.items():
            current = getattr(self, key)
            if dataclasses.is_dataclass(current) and not isinstance(current, type) and isinstance(value, Mapping):
                bad = sorted(set(value) - {f.name for f in dataclasses.fields(current)})
                _check(not bad, key, f"unknown key(s) {bad}")
                value = dataclasses.replace(current, **value)
            new[key] = value
        return dataclasses.replace(self, **new)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a JSON value to the annotated field type, or raise ScenarioError."""
    if typ is float:
        _check(isinstance(value, int | float) and not isinstance(value, bool), where,
               f"must be {_TYPE_NAMES[float]}, got {value!r}")
        return float(value)
    if typ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), where, f"must be an integer, got {value!r}")
        return int(value)
    if typ is str:
        _check(isinstance(value, str), where, f"must be a string, got {value!r}")
        return value
    if typ is bool:
        _check(isinstance(value, bool), where, f"must be true/false, got {value!r}")
        return value
    raise ScenarioError(f"{where}: unsupported field type {typ!r}")


def _field_type(annotation: str) -> tuple[str, Any]:
    """Map a (string) annotation to ('scalar'|'pair'|'optional', base type)."""
    ann = annotation.replace(" ", "")
    base = {"float": float, "int": int, "str": str, "bool": bool}
    if ann.startswith("tuple["):
        inner = ann[6:-1].split(",")
        return "pair", base[inner[0]]
    if ann.endswith("|None"):
        return "optional", base[ann[:-5]]
    return "scalar", base[ann]


def _section(cls: Any, data: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from a JSON object, checking keys and types."""
    _check(isinstance(data, Mapping), where, "must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    _check(not unknown, where, f"unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        kind, typ = _field_type(str(fields[key].type))
        path = f"{where}.{key}"
        if kind == "pair":
            _check(isinstance(value, list | tuple) and len(value) == 2, path, f"must be a list of 2, got {value!r}")
            kwargs[key] = tuple(_coerce(v, typ, path) for v in value)
        elif kind == "optional":
            kwargs[key] = None if value is None else _coerce(value, typ, path)
        else:
            kwargs[key] = _coerce(value, typ, path)
    try:
        return cls(**kwargs)
    except ScenarioError:
        raise
    except ValueError as exc:
        msg = str(exc)
        raise ScenarioError(msg if msg.startswith(f"{where}:") else f"{where}: {msg}") from exc


def builtin_scenarios() -> list[str]:
    """Names of the scenarios shipped in ``simulators/scenarios``."""
    folder = resources.files("stemlive.simulators").joinpath("scenarios")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a built-in scenario by name, or a scenario JSON file by path.

    Parameters
    ----------
    name_or_path : str or Path
        A built-in name (``"default"``, ``"realtime"``, ``"low_dose"``, ``"eels_mos2_wse2"``,
        ``"eels_aln_sic"``) or a path to a ``.json`` file.

    Raises
    ------
    ScenarioError
        Unknown name, unreadable file, invalid JSON, unknown keys or invalid values.
    """
    text: str
    where: str
    path = Path(name_or_path)
    if isinstance(name_or_path, str) and name_or_path in builtin_scenarios():
        res = resources.files("stemlive.simulators").joinpath("scenarios", f"{name_or_path}.json")
        text, where = res.read_text(encoding="utf-8"), f"scenario {name_or_path!r}"
    elif path.suffix == ".json" or path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"scenario file {str(path)!r}: {exc.strerror or exc}") from exc
        where = f"scenario file {str(path)!r}"
    else:
        raise ScenarioError(f"unknown scenario {str(name_or_path)!r}: not a built-in ({', '.join(builtin_scenarios())})"
                            " and not an existing .json file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{where}: invalid JSON: {exc}") from exc
    return Scenario.from_dict(data, where=where)
