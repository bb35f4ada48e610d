"""The GPU check's parts (`python -m hmtrain.bench.gpu_check` runs them): each section in its own process
(sections.py), the attention and training sections, and the report with the defaults it decides."""
