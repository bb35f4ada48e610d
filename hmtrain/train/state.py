"""The run's own checkpoint states: `TrainState` (where the run is) and `Batches` (the data stream).

Both are saved in the checkpoint's `trainer.json` (hmtrain/checkpoint/checkpointer.py): the train
state's fields at its top level, the batches' loader position under `loader`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

from hmtrain.checkpoint.formats import FORMAT
from hmtrain.data.loading.loader import StepLoader


@dataclass
class TrainState:
    """Steps taken, the phase whose optimizer the engine holds, the MLflow run; and, recorded for the
    checks a resume or an evaluation makes, the data fingerprints, mode, world size and format."""

    step: int = 0
    optimizer_phase: str = ""
    mlflow_run_id: Optional[str] = None
    data_fingerprints: dict[str, str] = field(default_factory=dict)
    mode: str = ""
    world_size: int = 1
    format: int = FORMAT

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, record: dict[str, Any]) -> None:
        # only where the run is; the recorded facts describe the saving run and are checked, not taken over
        self.step = int(record["step"])
        self.optimizer_phase = record.get("optimizer_phase", "")
        self.mlflow_run_id = record.get("mlflow_run_id")


class Batches:
    """This rank's micro-batches, step by step, and the loader position after the last step taken
    (the state the loader yielded with it: what a checkpoint saves). A new global batch size (at the
    phase switch) continues the same stream with a loader of the new size."""

    def __init__(self, make_loader: Callable[[int], StepLoader]):
        self._make_loader = make_loader
        self._position: Optional[dict] = None  # None: the start of the stream
        self._global_batch: Optional[int] = None
        self._iterator: Optional[Iterator] = None

    def next(self, global_batch: int) -> list[dict]:
        if global_batch != self._global_batch:
            loader = self._make_loader(global_batch)
            if self._position is not None:
                loader.load_state_dict(self._position)
            self._global_batch, self._iterator = global_batch, iter(loader)
        micro_batches, self._position = next(self._iterator)
        return micro_batches

    def state_dict(self) -> dict:
        if self._position is None:
            raise RuntimeError("the data stream's position is asked for before its first step")
        return self._position

    def load_state_dict(self, state: dict) -> None:
        self._position, self._global_batch, self._iterator = state, None, None
