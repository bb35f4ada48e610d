"""`eval`: how much `hmtrain eval` scores, in what batches."""
from __future__ import annotations

from dataclasses import dataclass

from hmtrain.config.checks import require, require_positive


@dataclass
class EvalConfig:
    # held-out sequences per evaluation batch (probes use 8x as many)
    batch_size: int = 8
    # held-out sequences used for perplexity; 0 = all
    max_sequences: int = 0
    # probe questions scored; 0 = all
    max_probes: int = 0

    @property
    def probe_batch_size(self) -> int:
        """(prompt, choice) pairs scored per probe batch: they are short, so eight batches' worth."""
        return 8 * self.batch_size

    def validate(self) -> None:
        require_positive(self, "eval", "batch_size")
        for name in ("max_sequences", "max_probes"):
            value = getattr(self, name)
            require(value >= 0, f"eval.{name}", f"must be >= 0 (0 = all), got {value}")
