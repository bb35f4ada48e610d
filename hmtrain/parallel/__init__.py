"""Devices, precision, process groups and wrapping (FSDP2 / DeepSpeed) for the anchor and bank."""
from hmtrain.parallel.device import Precision, resolve_precision

__all__ = ["Precision", "resolve_precision"]
