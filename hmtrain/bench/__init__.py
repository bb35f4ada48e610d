"""Benchmarks and the one-command GPU check (`python -m hmtrain.bench.gpu_check`)."""
