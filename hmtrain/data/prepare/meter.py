"""The throughput meter of `prepare`: every stage adds its documents and seconds, per step."""
from __future__ import annotations

import time
from collections import defaultdict


class Meter:
    """Documents, wall seconds and CPU seconds per step of a stage, for the throughput report
    (CPU seconds too: on a shared machine wall time also counts the waits for a core)."""

    def __init__(self) -> None:
        self.docs: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def add(self, step: str, docs: int, since: tuple[float, float]) -> tuple[float, float]:
        now = self.now()
        self.docs[step] += docs
        self.seconds[step] += now[0] - since[0]
        self.cpu[step] += now[1] - since[1]
        return now

    def rates(self) -> dict[str, dict]:
        def rate(seconds: float, docs: int) -> float:
            return docs / seconds if seconds > 0 else float("inf")

        return {step: {"documents": self.docs[step], "seconds": self.seconds[step], "cpu_seconds": self.cpu[step],
                       "docs_per_s": rate(self.seconds[step], self.docs[step]),
                       "docs_per_cpu_s": rate(self.cpu[step], self.docs[step])} for step in self.docs}
