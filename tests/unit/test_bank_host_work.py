"""The bank's host work per micro-batch does not grow with the world size (docs/design.md: O(tables)).

Rank 0 of a world of W ranks runs the real bank over a zero-latency fake communicator
(hmtrain/bench/bank_host.py); the test counts the index ops the bank dispatches and the host index
arrays it hands to torch (each a host-to-device copy on a GPU), not time."""
from hmtrain.bench.bank_host import OpCounter, bank_step, counting_uploads, make_bank, micro_batches

INDEX_OPS = ("index_select", "index_add_", "index_copy_")


def count(world: int, micro: int = 2) -> tuple[dict[str, int], int, int]:
    bank = make_bank(world, layers=2, d=8, units=[8, 4, 2])
    bank_step(bank, micro_batches(bank, 0, micro, batch=16))  # the first step may set things up
    counter = OpCounter()
    with counting_uploads() as uploads, counter:
        bank_step(bank, micro_batches(bank, 1, micro, batch=16))
    return {op: counter.ops.get(op, 0) for op in INDEX_OPS}, uploads[0], len(bank.specs)


def test_index_ops_and_uploads_per_micro_batch_do_not_grow_with_the_world():
    small_ops, small_uploads, tables = count(8)
    large_ops, large_uploads, _ = count(64)
    assert large_ops == small_ops
    assert large_uploads == small_uploads
    # one gather and one scatter (or add) per table and micro-batch each way, plus the step's own few
    assert sum(large_ops.values()) <= 2 * 8 * tables + 4 * tables



def test_index_arrays_are_copied_once_per_step_not_per_micro_batch():
    _, two, _ = count(8, micro=2)
    _, four, _ = count(8, micro=4)
    assert four == two
