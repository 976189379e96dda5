"""A minimal analysis stage for service tests: counts the data messages it analyses, optionally slowly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from stemlive.live.pipeline.stage import Result, Stage
from stemlive.live.wire import protocol


class CountingStage(Stage):
    """Counts frames and spectra and emits the running count; ``delay_s`` per message makes it an analysis slower
    than the acquisition (back-pressure, a lagging analysis at the session's end)."""

    name = "counting"
    kinds = frozenset({"tilt_series", "eels_line_scan", "eels_map"})
    defaults: ClassVar[dict[str, Any]] = {"delay_s": 0.0}

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self.n = 0

    def process(self, msg: protocol.Message) -> Iterator[Result]:
        delay = float(self.params["delay_s"])
        if delay > 0:
            time.sleep(delay)
        self.n += 1
        yield Result(self.name, "count", np.asarray(self.n), index=self.n - 1)

    def finish(self, status: str) -> Iterator[Result]:
        yield Result(self.name, "total", np.asarray(self.n))
