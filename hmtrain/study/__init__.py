"""`hmtrain study`: a grid of arms x seeds from one spec, run, evaluated and summarised (runner.py)."""
