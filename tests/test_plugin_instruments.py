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


def test_registered_when_asked_and_unregistered_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plug-in's own registration path (``run()`` in Swift; runs before the module's ``both`` fixture registers
    the simulator): asked for, the simulator is registered with its priority, and
    :func:`unregister_simulated_instrument` removes all of it again."""
    monkeypatch.setenv("STEMLIVE_INSTRUMENT", "simulated")
    monkeypatch.setenv("STEMLIVE_SCENARIO", "default")
    configuration = plugin.register_simulated_instrument()
    try:
        assert configuration is not None and plugin.register_simulated_instrument() is configuration
        assert controllers()[STEMLIVE_ID] is configuration.instrument
        assert configuration.instrument.priority == plugin.SIMULATED_INSTRUMENT_PRIORITY
    finally:
        plugin.unregister_simulated_instrument()
    assert STEMLIVE_ID not in controllers() and plugin._simulated_instrument is None and plugin._binding is None


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


@pytest.fixture
def app_data(tmp_path: Any) -> Iterator[Any]:
    """Swift's application data in a file of this test (what Swift keeps in nionswift_appdata.json)."""
    from nion.swift.model import ApplicationData

    before = ApplicationData.get_data()
    path = tmp_path / "nionswift_appdata.json"
    ApplicationData.set_file_path(path)
    try:
        yield path
    finally:
        ApplicationData.set_data(before)
        ApplicationData.set_file_path(None)  # type: ignore[arg-type]


def test_device_chooser_defaults_choice_and_memory(both: Any, app_data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from nion.swift import Panel
    from swift_harness import document_controller_for_tests

    from nionswift_plugin.stemlive import panels

    monkeypatch.setenv("STEMLIVE_RESULT_ENDPOINT", "none")

    def open_panel(document_controller: Any) -> Any:
        return Panel.PanelManager().create_panel_content(document_controller, panels.EELS_PANEL_ID,
                                                         panels.EELS_PANEL_ID, ["left", "right"], "left", {})

    with document_controller_for_tests() as document_controller:
        panel = open_panel(document_controller)
        model = panel.model
        # the defaults: Swift's default STEM controller (the simulator, asked for here) and its own devices
        assert model.instrument_items[model.instrument_index] == STEMLIVE_ID
        assert model.device_choice == plugin.instruments.DeviceChoice(STEMLIVE_ID, "stemlive_scan", "HAADF",
                                                                      "stemlive_eels_camera")
        assert set(model.instrument_items) >= {STEMLIVE_ID, USIM_ID}
        chosen = model.find_instrument()
        assert chosen.stem_controller is both.instrument and chosen.camera_source is both.eels
        # choose usim: its own scan, camera and HAADF channel follow
        model.instrument_changed(None, model.instrument_items.index(USIM_ID))
        assert model.device_choice == plugin.instruments.DeviceChoice(USIM_ID, "usim_scan_device", "HAADF",
                                                                      "usim_eels_camera")
        chosen = model.find_instrument()
        assert chosen.stem_controller is controllers()[USIM_ID]
        assert source_id(chosen.scan_source) == "usim_scan_device" and source_id(chosen.camera_source) == \
            "usim_eels_camera"
        assert chosen.channel_name == "HAADF" and chosen.channel == 0
        # a HAADF channel chosen by name
        model.channel_index = model.channel_items.index("MAADF")
        model.device_changed(None, model.channel_index)
        assert model.find_instrument().channel == 1
        model.exposure_text, model.points_text = "7", "5"
        model.endpoint = "tcp://10.0.0.9:7710"  # a deployment setting (stemlive swift / environment), not the plan
        model.remember_plan()
        panel.close()

        stored = json.loads(app_data.read_text())["stemlive"]["eels"]
        assert stored["devices"] == {"instrument": USIM_ID, "scan": "usim_scan_device", "channel": "MAADF",
                                     "camera": "usim_eels_camera"}
        assert stored["plan"]["exposure_text"] == "7" and stored["plan"]["points_text"] == "5"
        assert "endpoint" not in stored["plan"]

        again = open_panel(document_controller)  # as after a restart: the panel reads Swift's application data
        try:
            assert again.model.device_choice == plugin.instruments.DeviceChoice(USIM_ID, "usim_scan_device",
                                                                                "MAADF", "usim_eels_camera")
            assert (again.model.exposure_text, again.model.points_text) == ("7", "5")
            assert again.model.endpoint == panels.default_frame_endpoint()
        finally:
            again.close()
        # a remembered instrument that is gone: the defaults
        model = panels.EELSModel()
        model.refresh_devices(plugin.instruments.DeviceChoice("gone_stem_controller", "gone_scan"))
        assert model.device_choice.instrument == STEMLIVE_ID and model.device_choice.scan == "stemlive_scan"
        with pytest.raises(RuntimeError, match="'gone' is not registered"):
            plugin.instruments.find_instrument(plugin.instruments.DeviceChoice("gone"))

