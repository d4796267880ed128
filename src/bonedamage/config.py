"""Read ``params.yaml``, the one source of configuration for every stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """``params.yaml`` is missing, unreadable or lacks a section."""


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS) -> dict[str, Any]:
    """Load the whole params file as a dict."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            params = yaml.safe_load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: params file not found (run from the repo root or pass --params)"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def section(
    params: dict[str, Any], name: str, source: str | os.PathLike[str] = DEFAULT_PARAMS
) -> dict[str, Any]:
    """One top-level section, with a clear error when it is absent."""
    try:
        value = params[name]
    except KeyError as exc:
        raise ConfigError(f"{source}: no '{name}' section") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{name}' must be a mapping")
    return value
