"""The bank's backward allocates about one fetched-size buffer of row gradients, not one per layer."""
from types import SimpleNamespace

from hmtrain.bench.bank_backward import measure


def test_row_gradients_cost_at_most_twice_the_fetched_bytes():
    args = SimpleNamespace(layers=6, d=32, units=[16, 8, 4], batch=8, tokens=5)
    rows = {name: (fetched, backward) for name, fetched, backward in measure(args)}
    baseline = rows["per-sequence leaves"][1]
    fetched, bank = rows["bank (GatherBlocks)"]
    _, sliced = rows["one leaf, sliced per layer"]
    assert (bank - baseline) / fetched <= 2.0
    # the layout it replaced paid a whole-table gradient per layer: the measure must see that
    assert (sliced - baseline) / fetched > args.layers
