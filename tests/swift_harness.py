"""Shared pieces of the tests that run Nion Swift's headless harness with the simulated instrument."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any


def free_tcp_endpoint() -> str:
    """A loopback endpoint on a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def pump(document_controller: Any, until: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Run the UI thread's periodic work (queued UI updates) until ``until()`` holds."""
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        document_controller.periodic()
        time.sleep(0.01)
    document_controller.periodic()


@contextlib.contextmanager
def swift_with_simulator(scenario: str = "default", *, usim: bool = False, **configuration: Any) -> Iterator[Any]:
    """Swift's test application with the stemlive panels registered and the simulated instrument running headless
    in fast mode, bound to its own devices as the plug-in binds them; yields the hardware (``.instrument``,
    ``.scan``, ``.eels``). With ``usim``, Nion's simulator is loaded beside it by its own plug-in entry point."""
    from nion.swift.test import TestContext

    from nionswift_plugin.stemlive import bind_simulated_devices, panels
    from stemlive.simulators.devices import SimulatedInstrumentConfiguration, run_headless

    setup = TestContext.TestSetup()
    panels.register_panels()
    try:
        simulated = SimulatedInstrumentConfiguration(scenario, time_scale=0, **configuration)
        binding = None
        try:
            with run_headless(simulated) as hardware:
                binding = bind_simulated_devices(simulated)
                if usim:
                    with usim_registered():
                        yield hardware
                else:
                    yield hardware
        finally:
            if binding is not None:
                binding.close()
    finally:
        panels.unregister_panels()
        del setup


USIM_ID = "usim_stem_controller"


@contextlib.contextmanager
def usim_registered() -> Iterator[Any]:
    """Nion's usim loaded by its plug-in's ``run()`` (as Swift does); yields its STEM controller.

    usim's own ``stop()`` unregisters whatever ``stem_controller`` and ``camera_module`` components it finds, other
    instruments' included; this removes only usim's (by instrument id).
    """
    from nion.swift import Workspace
    from nion.utils import Registry
    from nionswift_plugin import usim

    usim.run()
    instrument = next(c for c in Registry.get_components_by_type("stem_controller")
                      if getattr(c, "instrument_id", None) == USIM_ID)
    try:
        yield instrument
    finally:
        for module in list(Registry.get_components_by_type("camera_module")):
            if getattr(module, "stem_controller_id", None) == USIM_ID:
                Registry.unregister_component(module, {"camera_module"})
        for module in list(Registry.get_components_by_type("scan_module")):
            if getattr(module, "stem_controller_id", None) == USIM_ID:
                Registry.unregister_component(module, {"scan_module"})
        Registry.unregister_component(instrument, {"instrument_controller", "stem_controller"})
        try:
            Workspace.WorkspaceManager().unregister_panel("simulator-instrument-panel")
        except KeyError:
            pass


@contextlib.contextmanager
def document_controller_for_tests() -> Iterator[Any]:
    """A headless document controller in a memory-backed profile, with no remembered stemlive panel settings
    (Swift's application data outlives a test in this process: what a run remembered is removed afterwards)."""
    from nion.swift.model import ApplicationData
    from nion.swift.test import TestContext

    def forget() -> None:
        data = ApplicationData.get_data()
        if data.pop("stemlive", None) is not None:
            ApplicationData.set_data(data)

    forget()
    try:
        with TestContext.create_memory_context() as context:
            yield context.create_document_controller()
    finally:
        forget()
