"""The label value that marks a position as not scored (padding, a masked target)."""

IGNORE_INDEX = -100  # torch's cross_entropy skips it by default (its ignore_index)
