"""`hmtrain config keys`: every config key with its type, default, allowed values and one line of help.

The help is the comment written above a field (or at the end of its line) in its section's dataclass
(hmtrain/config/*.py), so the key list cannot drift from the code; a field without one shows its type only.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
import io
import tokenize
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from hmtrain.config.root import Config


@dataclass(frozen=True)
class Key:
    name: str  # dotted, as overrides spell it
    type: str
    default: Any
    choices: tuple[str, ...]  # a choice key's allowed values, else ()
    help: str


def config_keys() -> list[Key]:
    return list(_walk(Config, Config(), ""))


def _walk(cls: type, defaults: Any, prefix: str):
    """The keys of section `cls` whose default values are `defaults` (a parent may set its own)."""
    hints, comments = typing.get_type_hints(cls), _field_comments(cls)
    for field in dataclasses.fields(cls):
        name, hint = f"{prefix}{field.name}", hints[field.name]
        nested = _dataclass_in(hint)
        if nested is not None:  # an optional section left null shows its own class's defaults
            yield from _walk(nested, getattr(defaults, field.name) or nested(), f"{name}.")
            continue
        choice = _enum_in(hint)
        yield Key(name, _type_name(hint), _plain(getattr(defaults, field.name)),
                  tuple(member.value for member in choice) if choice else (), comments.get(field.name, ""))


def _dataclass_in(hint) -> Optional[type]:
    """The section a field holds (also behind Optional), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate) and typing.get_origin(hint) is not list:
            return candidate
    return None


def _enum_in(hint) -> Optional[type[enum.Enum]]:
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return candidate
    return None


def _type_name(hint) -> str:
    text = str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))
    return text.replace("typing.", "").replace("hmtrain.config.", "")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@lru_cache(maxsize=None)
def _field_comments(cls: type) -> dict[str, str]:
    """field name -> the comment block just above its line in the class body, or the one ending it."""
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").rstrip())
            continue
        head = stripped.split(":", 1)[0]
        if ":" in stripped and head.isidentifier() and not stripped.startswith(("def ", "class ", "return")):
            trailing = _trailing_comment(line)
            text = " ".join(pending) or trailing
            if text and head not in comments:
                comments[head] = text
        pending = []
    return comments


def _trailing_comment(line: str) -> str:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError):
        return ""
    return next((t.string.lstrip("# ").rstrip() for t in tokens if t.type == tokenize.COMMENT), "")


def print_keys(prefix: str = "") -> int:
    """A table of the keys starting with `prefix`; returns how many it printed."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    chosen = [k for k in config_keys() if k.name.startswith(prefix)]
    table = Table(title="hmtrain config keys (override any with key=value)")
    table.add_column("key", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("default")
    table.add_column("help", ratio=1)
    for key in chosen:
        kind = " | ".join(key.choices) if key.choices else key.type  # a choice key shows what it allows
        table.add_row(*(escape(text) for text in (key.name, kind, repr(key.default), key.help)))  # "list[int]"
    if chosen:
        Console(width=max(Console().width, 160)).print(table)
    return len(chosen)
