"""Analysis parameters: stage defaults overridden by a TOML config file and ``--set stage.param=value``.

Parameters are a two-level mapping ``{stage_name: {param: value}}``. Every key must exist in the stage's
``defaults`` so that a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Params = dict[str, dict[str, Any]]


class ConfigError(ValueError):
    """A parameter file or ``--set`` override that cannot be applied."""


def parse_value(text: str) -> Any:
    """Parse the value of a ``--set`` override: JSON where it parses (numbers, booleans, lists), else a string.

    Examples
    --------
    >>> parse_value("3"), parse_value("true"), parse_value("[15, 30]"), parse_value("fit")
    (3, True, [15, 30], 'fit')
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split ``"stage.param=value"`` into its stage, parameter and parsed value."""
    key, sep, value = item.partition("=")
    stage, dot, param = key.strip().partition(".")
    if not sep or not dot or not stage or not param:
        raise ConfigError(f"--set {item!r}: expected STAGE.PARAM=VALUE, e.g. eels.k=3")
    return stage, param, parse_value(value.strip())


def load_config_file(path: str | Path) -> Params:
    """Read a TOML file with one table per stage, e.g. ``[eels]\\nk = 4``."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for stage, section in data.items():
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: [{stage}] must be a table of parameters")
    return {stage: dict(section) for stage, section in data.items()}


def resolve_params(
    defaults: Mapping[str, Mapping[str, Any]],
    *,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> Params:
    """Merge stage defaults, a config file, a mapping and ``--set`` overrides (later wins), checking every key.

    Parameters
    ----------
    defaults
        ``{stage: {param: default}}`` of the registered stages.
    config_file
        Optional TOML file with one table per stage.
    overrides
        ``"stage.param=value"`` strings from the command line.
    extra
        Programmatic overrides applied before ``overrides``.

    Returns
    -------
    dict
        The complete parameter set, a deep copy of ``defaults`` with the overrides applied.
    """
    params: Params = {stage: copy.deepcopy(dict(values)) for stage, values in defaults.items()}
    layers: list[Mapping[str, Mapping[str, Any]]] = []
    if config_file is not None:
        layers.append(load_config_file(config_file))
    if extra:
        layers.append(extra)
    cli: Params = {}
    for item in overrides:
        stage, param, value = parse_override(item)
        cli.setdefault(stage, {})[param] = value
    layers.append(cli)
    for layer in layers:
        for stage, values in layer.items():
            if stage not in params:
                raise ConfigError(f"unknown analysis stage {stage!r}; stages: {', '.join(sorted(params)) or 'none'}")
            for param, value in values.items():
                if param not in params[stage]:
                    known = ", ".join(sorted(params[stage]))
                    raise ConfigError(f"unknown parameter {stage}.{param}; {stage} has: {known}")
                params[stage][param] = value
    return params
