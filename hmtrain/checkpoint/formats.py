"""Checkpoint formats: what changed in the saved names, and loading an older format.

`trainer.json` records its `format` (`FORMAT` below) since format 2; a checkpoint without one is
format 1. Loading maps the current names onto the ones the checkpoint was saved under, so a
checkpoint of any earlier format loads into today's states.

1: bank tables named from `level0` (hmtrain up to commit d1e6143).
2: bank tables named from `level1`, as levels are numbered everywhere else; `format` recorded.
"""
from __future__ import annotations

import re
from typing import Any

FORMAT = 2
_BANK_TABLE = re.compile(r"^level(\d+)(?=\.|$)")


def format_of(record: dict[str, Any]) -> int:
    return int(record.get("format", 1))


def saved_name(key: str, record: dict[str, Any]) -> str:
    """The name a bank entry (`level2.weight`, `generic.step`, or a table name) has in the checkpoint of
    trainer `record`."""
    if format_of(record) >= 2:
        return key
    return _BANK_TABLE.sub(lambda m: f"level{int(m.group(1)) - 1}", key)


def as_saved(state: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """`state` (what a checkpoint loads into) under the names the checkpoint of trainer `record` uses;
    the same tensor objects, so a load into the result fills `state`."""
    if format_of(record) >= 2 or "bank" not in state:
        return state
    return {**state, "bank": {saved_name(key, record): value for key, value in state["bank"].items()}}
