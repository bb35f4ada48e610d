"""Checkpoint formats: what changed in the saved names, and loading an older format.

`trainer.json` records its `format` (`FORMAT` below) since format 2; a checkpoint without one is
format 1. Loading maps the current names onto the ones the checkpoint was saved under, and leaves
out what an older format did not save, so a checkpoint of any earlier format loads into today's states.

1: bank tables named from `level0` (hmtrain up to commit d1e6143).
2: bank tables named from `level1`, as levels are numbered everywhere else; `format` recorded.
3: a bank stored in bf16 also saves its fp32 master rows, `<table>.master` (hmtrain/memory/bank.py);
   loading an older bf16 checkpoint starts them from its bf16 rows.
"""
from __future__ import annotations

import re
from typing import Any

FORMAT = 3
_BANK_TABLE = re.compile(r"^level(\d+)(?=\.|$)")
_MASTER = ".master"  # the bank's master rows' entries end so (hmtrain/memory/bank.py: MASTER)


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
    the same tensor objects, so a load into the result fills `state`. Entries the checkpoint's format
    did not save (masters before format 3) are removed from `state["bank"]` itself: the bank's
    `load_state_dict` then sees what was not loaded, and starts it from what was."""
    if "bank" not in state:
        return state
    if format_of(record) < 3:
        for key in [key for key in state["bank"] if key.endswith(_MASTER)]:
            del state["bank"][key]
    if format_of(record) >= 2:
        return state
    return {**state, "bank": {saved_name(key, record): value for key, value in state["bank"].items()}}
