"""`eval`: how much `hmtrain eval` scores, in what batches, and which path routes a probe's memory."""
from __future__ import annotations

from dataclasses import dataclass

from hmtrain.config.checks import Choice, require, require_positive


class ProbeRouting(Choice):
    question = "question"  # the question alone, as the paper does
    context = "context"  # the prompt the choices are scored after: what the model conditions on
    oracle = "oracle"  # the path most of the probe's person's training documents were routed to


@dataclass
class EvalConfig:
    # held-out sequences per evaluation batch (probes use 8x as many)
    batch_size: int = 8
    # held-out sequences used for perplexity; 0 = all
    max_sequences: int = 0
    # probe questions scored; 0 = all
    max_probes: int = 0
    # the text (or the documents) a probe's memory is routed by (hmtrain/data/routing/questions.py)
    probe_routing: ProbeRouting = ProbeRouting.question

    @property
    def probe_batch_size(self) -> int:
        """(prompt, choice) pairs scored per probe batch: they are short, so eight batches' worth."""
        return 8 * self.batch_size

    def validate(self) -> None:
        require_positive(self, "eval", "batch_size")
        for name in ("max_sequences", "max_probes"):
            value = getattr(self, name)
            require(value >= 0, f"eval.{name}", f"must be >= 0 (0 = all), got {value}")
