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
def swift_with_simulator(scenario: str = "default", **configuration: Any) -> Iterator[Any]:
    """Swift's test application with the stemlive panels registered and the simulated instrument running headless
    in fast mode; yields the hardware (``.instrument``, ``.scan``, ``.eels``)."""
    from nion.swift.test import TestContext

    from nionswift_plugin.stemlive import panels
    from stemlive.simulators.devices import SimulatedInstrumentConfiguration, run_headless

    setup = TestContext.TestSetup()
    panels.register_panels()
    try:
        with run_headless(SimulatedInstrumentConfiguration(scenario, time_scale=0, **configuration)) as hardware:
            yield hardware
    finally:
        panels.unregister_panels()
        del setup


@contextlib.contextmanager
def document_controller_for_tests() -> Iterator[Any]:
    """A headless document controller in a memory-backed profile."""
    from nion.swift.test import TestContext

    with TestContext.create_memory_context() as context:
        yield context.create_document_controller()
