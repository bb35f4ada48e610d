"""Checkpoints: writing and loading them (checkpointer.py), reading one without loading it (verify.py),
and the rules a resumed run must meet (resume.py)."""
