"""Tests of the simulator's sample model, scenarios, stage/drift models and ground-truth file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemlive.simulators.sample import REGION_MOS2, REGION_WSE2, AtomSet, Heterojunction
from stemlive.simulators.scenario import (
    Scenario,
    ScenarioError,
    StageParams,
    builtin_scenarios,
    load_scenario,
)
from stemlive.simulators.stage import (
    DriftModel,
    StageModel,
    fov_shift_nm,
    rotation_matrix,
    to_euler_zyx_deg,
)
from stemlive.simulators.truth import GroundTruth, truth_path_for

REFERENCE = Path("/work/shared/reference/tilt_series_mos2_wse2.json")
REF_TILTS = [(0.0, 0.0), (-14.3, -22.9), (-14.3, 17.1), (20.1, 17.1), (20.1, -20.1), (12.6, -12.6), (12.6, 12.6),
             (-12.6, 12.6), (-12.6, -12.6), (-6.3, -6.3), (-6.3, 6.3), (6.3, 6.3)]


@pytest.fixture(scope="module")
def atoms() -> AtomSet:
    return Heterojunction(ripple_amplitude_A=0.0).atoms()


# ---------------------------------------------------------------- sample


def test_default_flake_size_and_composition() -> None:
    a = Heterojunction().atoms()
    assert 7_000 <= len(a) <= 9_000
    c = a.counts()
    assert set(c) == {"Mo", "S", "W", "Se"}
    # metals: one per cell; each side ~ its area / cell area (16 x 8 nm halves)
    cell_mo, cell_w = math.sqrt(3) / 2 * 3.165**2, math.sqrt(3) / 2 * 3.34**2
    assert c["Mo"] == pytest.approx(160 * 80 / cell_mo, rel=0.03)
    assert c["W"] == pytest.approx(160 * 80 / cell_w, rel=0.03)
    assert np.all(a.Z[a.species == "Mo"] == 42) and np.all(a.Z[a.species == "Se"] == 34)
    assert np.all(a.positions_A[a.region == REGION_MOS2, 0] < 0)
    assert np.all(a.positions_A[a.region == REGION_WSE2, 0] >= 0)


@pytest.mark.parametrize(("region", "metal", "a_A"), [(REGION_MOS2, "Mo", 3.165), (REGION_WSE2, "W", 3.34)])
def test_metal_lattice_constant_per_side(atoms: AtomSet, region: int, metal: str, a_A: float) -> None:
    m = atoms.select((atoms.species == metal) & (np.abs(atoms.positions_A[:, 0]) > 10))
    d, _ = cKDTree(m.positions_A).query(m.positions_A, k=7)
    assert np.median(d[:, 1:]) == pytest.approx(a_A, abs=1e-9)  # 6 nearest metal neighbours at a


def test_chalcogen_heights_and_no_close_atoms(atoms: AtomSet) -> None:
    z = atoms.positions_A[:, 2]
    assert np.allclose(np.abs(z[atoms.species == "S"]), 1.56)
    assert np.allclose(np.abs(z[atoms.species == "Se"]), 1.67)
    assert np.all(z[np.isin(atoms.species, ["Mo", "W"])] == 0)
    d, _ = cKDTree(atoms.positions_A).query(atoms.positions_A, k=2)
    assert d[:, 1].min() >= 1.6


def test_vacancies_and_substitutions_follow_fractions() -> None:
    h = Heterojunction(vacancy_fraction=0.05, interface_substitution_fraction=0.5, random_substitution_fraction=0.0,
                       ripple_amplitude_A=0.0)
    a, full = h.atoms(), Heterojunction(vacancy_fraction=0.0, interface_substitution_fraction=0.0,
                                        random_substitution_fraction=0.0, ripple_amplitude_A=0.0).atoms()
    n_ch = lambda s: int(np.isin(s.species, ["S", "Se"]).sum())  # noqa: E731
    assert n_ch(a) / n_ch(full) == pytest.approx(0.95, abs=0.01)
    x = a.positions_A[:, 0]
    wrong = ((a.species == "Se") & (a.region == REGION_MOS2)) | ((a.species == "S") & (a.region == REGION_WSE2))
    assert np.all(np.abs(x[wrong]) <= 5.0)  # only within the 1 nm interface band
    band = np.isin(a.species, ["S", "Se"]) & (np.abs(x) <= 5.0)
    assert wrong[band].mean() == pytest.approx(0.5, abs=0.1)


def test_ripple_amplitude_wavelength_and_decay() -> None:
    a = Heterojunction(vacancy_fraction=0.0).atoms()
    m = np.isin(a.species, ["Mo", "W"])
    x, y, z = a.positions_A[m].T
    near = np.abs(x) < 2
    assert np.abs(z[near]).max() == pytest.approx(1.5, rel=0.05)
    # along the interface: z ~ A cos(2 pi y / 50 A)
    fit = np.linalg.lstsq(np.c_[np.cos(2 * np.pi * y[near] / 50), np.sin(2 * np.pi * y[near] / 50)], z[near],
                          rcond=None)[0]
    assert np.hypot(*fit) == pytest.approx(1.5 * np.exp(-np.abs(x[near]).mean() / 30), rel=0.05)
    assert np.abs(z[np.abs(x) > 70]).max() < 1.5 * np.exp(-70 / 30) + 1e-9


def test_atoms_reproducible_and_immutable() -> None:
    a, b = Heterojunction(seed=3).atoms(), Heterojunction(seed=3).atoms()
    c = Heterojunction(seed=4).atoms()
    assert np.array_equal(a.positions_A, b.positions_A) and np.array_equal(a.species, b.species)
    assert not (len(a) == len(c) and np.array_equal(a.species, c.species))
    with pytest.raises(ValueError):
        a.positions_A[0, 0] = 1.0
    sub = a.select(a.Z == 74)
    assert len(sub) == a.counts()["W"] and set(sub.species) == {"W"}


def test_in_plane_rotation_rotates_the_interface() -> None:
    a = Heterojunction(in_plane_rotation_deg=90.0, ripple_amplitude_A=0.0).atoms()
    assert np.all(a.positions_A[a.region == REGION_MOS2, 1] < 1e-9)  # MoS2 now at y < 0
    assert np.all(a.positions_A[a.region == REGION_WSE2, 1] > -1e-9)


# ---------------------------------------------------------------- scenario


def test_builtin_scenarios_load() -> None:
    names = builtin_scenarios()
    assert {"default", "realtime", "low_dose", "eels_mos2_wse2", "eels_aln_sic"} <= set(names)
    assert load_scenario("default").time_scale == 0.0
    assert load_scenario("realtime").time_scale == 1.0
    low, default = load_scenario("low_dose"), load_scenario("default")
    assert low.haadf.beam_current_pA * low.haadf.dwell_us < default.haadf.beam_current_pA * default.haadf.dwell_us
    assert load_scenario("eels_mos2_wse2").eels["system"] == "mos2_wse2"
    assert load_scenario("eels_aln_sic").eels["system"] == "aln_sic"
    assert default.haadf.fov_nm / default.haadf.shape_px[1] == pytest.approx(0.032)  # reference pixel 0.32 A


def test_default_drift_is_sub_pixel_per_frame() -> None:
    s = load_scenario("default")
    px_nm = s.haadf.fov_nm / max(s.haadf.shape_px)
    frame_s = s.haadf.shape_px[0] * (s.haadf.shape_px[1] * s.haadf.dwell_us + s.haadf.flyback_us) * 1e-6
    per_frame = np.abs(s.drift.velocity_nm_per_s) * frame_s / px_nm
    assert np.all((per_frame >= 0.1) & (per_frame <= 1.0))


def test_scenario_roundtrip_and_file(tmp_path: Path) -> None:
    s = load_scenario("default")
    assert Scenario.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"name": "mine", "seed": 5, "haadf": {"beam_current_pA": 3.0}, "eels": {"x": [1, 2]}}))
    m = load_scenario(p)
    assert (m.name, m.haadf.beam_current_pA, m.eels, m.sample.seed) == ("mine", 3.0, {"x": [1, 2]}, 5)
    assert m.replace(haadf={"dwell_us": 2.0}).haadf.dwell_us == 2.0


@pytest.mark.parametrize(("data", "match"), [
    ({"haadf": {"beam_curent_pA": 1}}, r"haadf: unknown key.*beam_curent_pA"),
    ({"bogus": 1}, r"unknown key.*bogus"),
    ({"haadf": {"beam_current_pA": -1}}, r"haadf.beam_current_pA"),
    ({"haadf": {"probe_fwhm_A": "1.3"}}, r"haadf.probe_fwhm_A: must be a number"),
    ({"drift": {"velocity_nm_per_s": [1.0]}}, r"drift.velocity_nm_per_s"),
    ({"sample": {"vacancy_fraction": 2.0}}, r"vacancy_fraction"),
    ({"stage": {"limits_deg": [0, 30]}}, r"stage.limits_deg"),
    ({"time_scale": -1}, r"time_scale"),
    ({"seed": 1.5}, r"seed: must be an integer"),
    ({"eels": [1]}, r"eels: must be a JSON object"),
])
def test_scenario_errors(data: dict, match: str) -> None:
    with pytest.raises(ScenarioError, match=match):
        Scenario.from_dict(data)


def test_load_scenario_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="unknown scenario 'nope'"):
        load_scenario("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ScenarioError, match="invalid JSON"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="missing.json"):
        load_scenario(tmp_path / "missing.json")


# ---------------------------------------------------------------- stage


def test_rotation_axes_match_reference_convention() -> None:
    ref = json.loads(REFERENCE.read_text())["tilts"]["axes"] if REFERENCE.exists() else None
    if ref is not None:
        assert (ref["alpha"], ref["beta"]) == ("[0 -1 0]", "[-1 0 0]")
    a = 20.0
    r = rotation_matrix(a, 0.0)
    assert np.allclose(r @ [0, 0, 1], [-math.sin(math.radians(a)), 0, math.cos(math.radians(a))])  # about -y
    assert np.allclose(r @ [0, 1, 0], [0, 1, 0])
    rb = rotation_matrix(0.0, a)
    assert np.allclose(rb @ [0, 0, 1], [0, math.sin(math.radians(a)), math.cos(math.radians(a))])  # about -x
    r = rotation_matrix(12.6, -20.1)
    assert np.allclose(r @ r.T, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)
    z, y, x = to_euler_zyx_deg(r)
    assert (z, y, x) == pytest.approx((0.0, -12.6, 20.1), abs=1e-9)  # reference Euler ZYX: Y = -alpha, X = -beta
    # beta is carried by alpha: R = R_alpha @ R_beta
    assert np.allclose(r, rotation_matrix(12.6, 0) @ rotation_matrix(0, -20.1))


def test_fov_shift_is_height_times_sin_tilt() -> None:
    dy, dx = fov_shift_nm(20.0, 0.0, 50.0)
    assert (dy, dx) == pytest.approx((0.0, -50 * math.sin(math.radians(20))))
    dy, dx = fov_shift_nm(0.0, -15.0, 50.0)
    assert (dy, dx) == pytest.approx((50 * math.sin(math.radians(-15)), 0.0))


def test_hysteresis_in_reference_range() -> None:
    """Offsets over the reference tilt sequence have the size of the reference's row-1 difference (2.3 deg)."""
    stage = StageModel(StageParams(), seed=7)
    offsets = []
    for i, (a, b) in enumerate(REF_TILTS):
        st = stage.move_to(a, b, t_s=10.0 * i)
        offsets.append((st.actual_alpha_deg - a, st.actual_beta_deg - b))
        # backlash sign follows the direction of the move
        assert np.sign(st.actual_alpha_deg - a) == st.direction[0] or abs(st.actual_alpha_deg - a) < 1.2
    off = np.array(offsets)
    total = np.hypot(off[:, 0], off[:, 1])
    assert 1.0 < np.median(total) < 4.0
    assert np.all(np.abs(off[:, 0]) <= 1.1 + 5 * 0.3) and np.all(np.abs(off[:, 1]) <= 2.0 + 5 * 0.3)
    # same sequence, same seed -> same angles; approach from the other side flips the backlash
    again = StageModel(StageParams(), seed=7)
    assert [again.move_to(a, b, 10.0 * i).actual_alpha_deg for i, (a, b) in enumerate(REF_TILTS)] == \
        pytest.approx([s.actual_alpha_deg for s in stage.history])
    s2 = StageModel(StageParams(random_deg=0.0), seed=0)
    up = s2.move_to(10.0, 10.0).actual_alpha_deg
    s2.move_to(20.0, 20.0)
    down = s2.move_to(10.0, 10.0)
    assert up - down.actual_alpha_deg == pytest.approx(2 * 1.1)
    assert down.direction == (-1, -1)


def test_stage_settling_and_limits() -> None:
    stage = StageModel(StageParams(random_deg=0.0, settle_time_s=2.0, hysteresis_deg=(0.0, 0.0)), seed=0)
    stage.move_to(20.0, 0.0, t_s=100.0)
    assert not stage.is_settled(101.0) and stage.is_settled(102.0)
    assert stage.actual_angles_deg(100.0)[0] == pytest.approx(0.0)
    assert stage.actual_angles_deg(100.4)[0] == pytest.approx(20 * (1 - math.exp(-1)), rel=1e-6)
    assert stage.actual_angles_deg(102.0)[0] == pytest.approx(20.0, abs=0.2)
    with pytest.raises(ValueError, match="outside stage limits"):
        stage.move_to(40.0, 0.0)
    assert stage.history[-1].to_dict()["nominal_alpha_deg"] == 20.0


# ---------------------------------------------------------------- drift


def test_linear_drift_is_exact() -> None:
    d = DriftModel((0.01, -0.02), 0.0, seed=1)
    t = np.array([0.0, 1.0, 123.4])
    assert np.allclose(d.position_nm(t), t[:, None] * [0.01, -0.02])


def test_random_walk_statistics_and_reproducibility() -> None:
    sigma, t = 0.01, np.array([4.0, 64.0])
    ends = np.array([DriftModel((0, 0), sigma, seed=s).position_nm(t) for s in range(400)])  # (400, 2, 2)
    std = ends.std(axis=(0, 2))
    assert std == pytest.approx(sigma * np.sqrt(t), rel=0.12)
    a = DriftModel((0.0, 0.0), sigma, seed=9)
    late = a.position_nm(np.array([1000.0, 3.3]))
    b = DriftModel((0.0, 0.0), sigma, seed=9)
    assert np.allclose(b.position_nm(3.3), late[1]) and np.allclose(b.position_nm(1000.0), late[0])
    # smooth: the velocity is continuous across a knot
    v = np.diff(b.position_nm(np.array([0.5 - 2e-6, 0.5 - 1e-6, 0.5 + 1e-6, 0.5 + 2e-6])), axis=0) / 1e-6
    assert np.allclose(v[0], v[2], atol=1e-3 * np.abs(v).max() + 1e-9)
    assert np.allclose(b.position_nm(0.0), 0.0)


# ---------------------------------------------------------------- truth


def test_ground_truth_file(tmp_path: Path) -> None:
    gt = GroundTruth(scenario="default", seed=1)
    st = StageModel(StageParams(), seed=1).move_to(10.0, -5.0)
    gt.add_tilt(st, tilt_index=0)
    gt.add_spectrum({"temperature_K": 300.0, "region": 1, "energy_shift_meV": np.float32(0.5)}, point_index=3)
    gt.add("custom", {"a": np.arange(3)})
    session = tmp_path / "s1.h5"
    path = gt.write_next_to(session)
    assert path == tmp_path / "s1.truth.json" == truth_path_for(session)
    data = json.loads(path.read_text())
    assert data["format"] == "stemlive-truth" and data["meta"]["scenario"] == "default"
    assert data["records"]["tilt"][0]["nominal_alpha_deg"] == 10.0 and data["records"]["tilt"][0]["tilt_index"] == 0
    assert data["records"]["spectrum"][0]["energy_shift_meV"] == 0.5
    assert GroundTruth.from_json(path).get("custom") == [{"a": [0, 1, 2]}]
