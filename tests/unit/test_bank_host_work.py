"""The bank's host work per micro-batch does not grow with the world size (docs/design.md: O(tables)).

Rank 0 of a world of W ranks runs the real bank over a zero-latency fake communicator
(hmtrain/bench/bank_host.py); the test counts the index ops the bank dispatches and the host index
arrays it hands to torch (each a host-to-device copy on a GPU), not time. Index arrays that happen to be
runs of consecutive ids are read as slices (hmtrain/memory/indices.py) and dispatch fewer index ops, which
depends on the data: the bound is checked with that off (every array a gather), and with it on against that."""
from hmtrain.bench.bank_host import OpCounter, bank_step, counting_uploads, make_bank, micro_batches
from hmtrain.memory.indices import DeviceIndices

INDEX_OPS = ("index_select", "index_add_", "index_copy_")


def count(world: int, micro: int = 2, monkeypatch=None) -> tuple[dict[str, int], int, int]:
    """Index ops and uploads of one step; with `monkeypatch`, as if no index array were a run."""
    if monkeypatch is not None:
        monkeypatch.setattr(DeviceIndices, "run", lambda self, key: None)
    bank = make_bank(world, layers=2, d=8, units=[8, 4, 2])
    bank_step(bank, micro_batches(bank, 0, micro, batch=16))  # the first step may set things up
    counter = OpCounter()
    with counting_uploads() as uploads, counter:
        bank_step(bank, micro_batches(bank, 1, micro, batch=16))
    return {op: counter.ops.get(op, 0) for op in INDEX_OPS}, uploads[0], len(bank.specs)


def test_index_ops_and_uploads_per_micro_batch_do_not_grow_with_the_world(monkeypatch):
    with_runs = {world: count(world)[0] for world in (8, 64)}
    small_ops, small_uploads, tables = count(8, monkeypatch=monkeypatch)
    large_ops, large_uploads, _ = count(64, monkeypatch=monkeypatch)
    assert large_ops == small_ops
    assert large_uploads == small_uploads
    # one gather and one scatter (or add) per table and micro-batch each way, plus the step's own few
    assert sum(large_ops.values()) <= 2 * 8 * tables + 4 * tables
    # runs read as slices only ever take index ops away
    for world, ops in with_runs.items():
        assert all(ops[op] <= large_ops[op] for op in INDEX_OPS), (world, ops, large_ops)



def test_index_arrays_are_copied_once_per_step_not_per_micro_batch():
    _, two, _ = count(8, micro=2)
    _, four, _ = count(8, micro=4)
    assert four == two
