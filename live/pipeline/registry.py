"""The stage registry: the built-in stages and any others registered with ``register_stage``, and their parameters.

Importing this module imports the built-in stages (:mod:`~stemlive.live.pipeline.tilt_stage`,
:mod:`~stemlive.live.pipeline.eels_stage`); the stage interface itself (:mod:`stemlive.live.pipeline.stage`) does
not, so stages can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stemlive.live.config import Params, resolve_params
from stemlive.live.pipeline import eels_stage as _eels_stage  # noqa: F401  (importing a stage registers it)
from stemlive.live.pipeline import tilt_stage as _tilt_stage  # noqa: F401
from stemlive.live.pipeline.stage import Stage, all_stages


def registered_stages() -> dict[str, type[Stage]]:
    """All registered stages by name, the built-in ones included."""
    return all_stages()


def default_params() -> Params:
    """The defaults of every registered stage, ``{stage: {param: value}}``."""
    return {name: dict(cls.defaults) for name, cls in registered_stages().items()}


def make_params(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """Stage defaults merged with a TOML file and ``--set`` overrides; unknown keys are errors."""
    return resolve_params(default_params(), config_file=config_file, overrides=overrides)
