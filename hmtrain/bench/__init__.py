"""Benchmarks that print a table: each module here is one, run as `python -m hmtrain.bench.NAME` or
`hmtrain bench NAME`, with its own options (`--help`) and a `main(argv)`. None is imported by the library.
`gpu_check` runs the GPU check (its parts are the `gpu` package: not a benchmark of its own)."""
import pkgutil

NAMES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.ispkg))
