"""Labels as parts of metric names that MLflow accepts (alphanumerics, `_`, `-`, `.`, `/`)."""
from __future__ import annotations

import re


def metric_key(label: str) -> str:
    """A row name or bucket label as a metric name part ("16+" -> "16plus", "a b" -> "a_b")."""
    return re.sub(r"[^\w.\-]", "_", label.replace("+", "plus"))
