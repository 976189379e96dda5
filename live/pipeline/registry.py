"""The stage registry: the built-in stages and any others registered with ``register_stage``, and their parameters.

Importing this module imports :mod:`stemlive.live.pipeline.stages` (which registers the built-in stages); the
stage interface itself (:mod:`stemlive.live.pipeline.stage`) does not, so stages can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stemlive.live.config import Params, resolve_params
from stemlive.live.pipeline import stages as _builtin_stages  # noqa: F401  (importing registers them)
from stemlive.live.pipeline.stage import Stage, all_stages


def registered_stages() -> dict[str, type[Stage]]:
    """All registered stages by name (importing :mod:`stemlive.live.pipeline.stages` registers the built-in ones)."""
    return all_stages()


def default_params() -> Params:
    """The defaults of every registered stage, ``{stage: {param: value}}``."""
    return {name: dict(cls.defaults) for name, cls in registered_stages().items()}


def make_params(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """Stage defaults merged with a TOML file and ``--set`` overrides; unknown keys are errors."""
    return resolve_params(default_params(), config_file=config_file, overrides=overrides)
