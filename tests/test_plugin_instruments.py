"""Instrument selection in Swift's headless harness, with Nion's usim and the stemlive simulator both loaded.

- the simulator registers only when asked (``STEMLIVE_INSTRUMENT=simulated``), never in a plain Swift;
- each instrument's STEM controller resolves its own scan and cameras (no cross-wiring through the registry);
- the panels' device chooser defaults to what Nion's own panels use and remembers the choice and the last plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.swift

TestContext = pytest.importorskip("nion.swift.test.TestContext")

from nion.utils import Registry  # noqa: E402
from swift_harness import USIM_ID, swift_with_simulator  # noqa: E402

import nionswift_plugin.stemlive as plugin  # noqa: E402

STEMLIVE_ID = "stemlive_stem_controller"


def controllers() -> dict[str, Any]:
    return {getattr(c, "instrument_id", "?"): c for c in Registry.get_components_by_type("stem_controller")}


def source_id(hardware_source: Any) -> str | None:
    return getattr(hardware_source, "hardware_source_id", None)


@pytest.mark.parametrize("value", [None, "", "none", "usim"])
def test_the_simulator_registers_only_when_asked(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("STEMLIVE_INSTRUMENT", raising=False)
    else:
        monkeypatch.setenv("STEMLIVE_INSTRUMENT", value)
    assert plugin._simulated_instrument is None
    assert plugin.register_simulated_instrument() is None
    assert STEMLIVE_ID not in controllers()
    assert not plugin.simulator_requested()
    monkeypatch.setenv("STEMLIVE_INSTRUMENT", "Simulated")
    assert plugin.simulator_requested()


@pytest.fixture(scope="module")
def both() -> Iterator[Any]:
    with swift_with_simulator("default", usim=True) as hardware:
        yield hardware


def test_each_instrument_binds_its_own_devices(both: Any) -> None:
    found = controllers()
    assert {STEMLIVE_ID, USIM_ID} <= set(found)
    stemlive, usim = found[STEMLIVE_ID], found[USIM_ID]
    assert stemlive is both.instrument
    assert source_id(stemlive.scan_controller) == "stemlive_scan"
    assert source_id(stemlive.eels_camera) == "stemlive_eels_camera"
    assert source_id(stemlive.ronchigram_camera) == "stemlive_ronchigram_camera"
    assert source_id(usim.scan_controller) == "usim_scan_device"
    assert source_id(usim.eels_camera) == "usim_eels_camera"
    assert source_id(usim.ronchigram_camera) == "usim_ronchigram_camera"
    # Nion's registry-wide look-ups (what Nion's panels and scripts use) resolve to one instrument's devices
    assert source_id(Registry.get_component("eels_camera_hardware_source")) == "usim_eels_camera"
    # the simulator was asked for in this session: it is Swift's default STEM controller
    assert Registry.get_component("stem_controller") is stemlive
