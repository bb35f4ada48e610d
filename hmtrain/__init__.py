"""hmtrain: small language models with a hierarchical parametric memory bank."""

__version__ = "0.1.0"
