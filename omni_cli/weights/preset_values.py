"""The values of a preset file, each checked as it is read: a wrong type, a size that is not a
finite number, a count below 1 is a one-line ConfigError naming the key, never a traceback
(a preset is a file the user may have edited or downloaded)."""

from __future__ import annotations

import math
from typing import Any

from omni_cli.errors import ConfigError

GB = 1e9  # sizes shown to people are decimal gigabytes, as download tools show them


def table(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    """The table `[key]`."""
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"preset {source} lacks the [{key}] table; compare it with models/llama-omni-8b.toml.")
    return value


def typed(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    """The value of `key`, of type `kind` (a bool is not an int)."""
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"preset {source}: '{key}' is missing or not a {getattr(kind, '__name__', kind)}.")
    return value


def count(raw: dict[str, Any], key: str, source: str, optional: bool = False) -> int | None:
    """A whole number of at least 1 (a size in bytes, a layer, units per chunk); `optional`: may be absent or 0 (not pinned)."""
    value = raw.get(key)
    if optional and value in (None, 0):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"preset {source}: '{key}' should be a whole number of at least 1, found {value!r}.")
    return value


def gigabytes(raw: dict[str, Any], source: str) -> int:
    """`approx_size_gb` (a finite number, at least 0) in bytes."""
    value = typed(raw, "approx_size_gb", (int, float), source)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"preset {source}: 'approx_size_gb' should be a size in GB, found {value!r}.")
    return int(value * GB)


def strings(raw: dict[str, Any], key: str, source: str, default: list[str] | None = None) -> tuple[str, ...]:
    """A list of strings (file names or patterns)."""
    value = raw.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"preset {source}: '{key}' should be a list of names in quotes, found {value!r}.")
    return tuple(value)


def config_table(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The part's `config` table (config.json keys for sizing the model before download); empty when absent."""
    value = raw.get("config", {})
    if not isinstance(value, dict):
        raise ConfigError(f"preset {source}: 'config' should be a table of config.json keys, found {value!r}.")
    return dict(value)
