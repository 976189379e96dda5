"""Nion's own scan and camera device suites run against the stemlive simulated instrument (fast mode).

The classes subclass ``nion.instrumentation.test.ScanControl_test.TestScanControlClass`` and
``CameraControl_test.TestCameraControlClass`` and override ``_test_context`` as usim's plug-in tests do. Tests that
cannot apply to this instrument are overridden with ``unittest.skip`` and a reason.
"""

from __future__ import annotations

import unittest

import pytest
from nion.instrumentation.test import AcquisitionTestContext, CameraControl_test, ScanControl_test

from stemlive.simulators import devices

pytestmark = [pytest.mark.swift, pytest.mark.slow]


def _context(*, is_eels: bool = False) -> AcquisitionTestContext.AcquisitionTestContext:
    # fast mode; a temporary configuration folder (never ./test_data)
    # nion_suite_geometry: usim's sensor shapes and scan/camera profiles, which the suites hard-code
    configuration = devices.SimulatedInstrumentConfiguration("default", time_scale=0.0,
                                                             set_configuration_location=True,
                                                             nion_suite_geometry=True)
    return AcquisitionTestContext.AcquisitionTestContext(configuration, is_eels=is_eels)


class TestStemliveScanControl(ScanControl_test.TestScanControlClass):
    """Nion's scan-device suite on ``stemlive_scan``."""

    def _test_context(self, *, is_eels: bool = False) -> AcquisitionTestContext.AcquisitionTestContext:
        return _context(is_eels=is_eels)


class TestStemliveCameraControl(CameraControl_test.TestCameraControlClass):
    """Nion's camera suite on ``stemlive_eels_camera`` (is_eels) and the Ronchigram camera."""

    def _test_context(self, *, is_eels: bool = False) -> AcquisitionTestContext.AcquisitionTestContext:
        return _context(is_eels=is_eels)

    @unittest.skip("runtime: ~240 s on 2 cores (every acquisition method x both cameras at 1024^2/2048^2); "
                   "sequence and scan-sequence acquisition are covered by the other acquisition_panel tests")
    def test_acquisition_panel_acquisition(self) -> None:
        pass

    @unittest.skip("runtime: ~110 s on 2 cores (series acquisitions of 2048^2 Ronchigram frames); "
                   "restarting view is also exercised by test_acquisition_panel_sequence_acquisition")
    def test_acquisition_panel_acquisition_restarts_view(self) -> None:
        pass


if __name__ == "__main__":
    unittest.main()
