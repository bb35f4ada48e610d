"""Helpers every part of hmtrain shares: crash-safe file writes (files.py) and the ignore label (labels.py)."""
