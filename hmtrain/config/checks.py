"""`Choice`: the base of every config field with a fixed set of values; `require`, the one check, and the
checks built on it.

A choice is a `StrEnum` whose member names are its values, so omegaconf accepts the plain names a
YAML file or a `key=value` override writes (and config.yaml files written before the fields were
Enums), rejects any other, and code may compare a member with its name (`cfg.train.mode == "dense"`).
"""
from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from enum import StrEnum


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is wrong."""


class Choice(StrEnum):
    def __repr__(self) -> str:
        """The plain name's repr ('lm'), so messages that show a value with !r read as they did for strings."""
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The allowed values as plain strings, for code that checks a value given without a config."""
        return tuple(member.value for member in cls)

    @classmethod
    def names(cls) -> str:
        """The allowed values as a phrase: "auto, flex or sdpa"."""
        values = cls.values()
        return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {message}")


def require_positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(value > 0, f"{prefix}.{name}", f"must be positive, got {value}")


def require_finite(node: object, key: str) -> None:
    """Every float of a section, its nested sections and lists included, is a finite number: no key gives
    inf or nan a meaning, and either would train or score NaN to the end without an error."""
    if is_dataclass(node):
        for f in fields(node):
            require_finite(getattr(node, f.name), f"{key}.{f.name}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            require_finite(item, f"{key}[{i}]")
    elif isinstance(node, float):
        require(math.isfinite(node), key, f"must be a finite number, got {node}")
