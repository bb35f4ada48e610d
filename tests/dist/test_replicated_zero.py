"""Replicated tables under ZeRO-1 (hmtrain/memory/zero.py): every rank keeps every stored row, but the masters,
moments and step counts of only its torch.chunk slice, so they fall as 1/W; the bank still trains as one process
does, and its sharded state resumes on other world sizes."""
import pytest
import torch
import torch.distributed.checkpoint as dcp

from hmtrain.memory.layout import by_subtree, chunk_rows, pieces_per_row
from hmtrain.memory.sizes import level_nodes
from hmtrain.parallel.placement import assign_groups
from tests.dist import bank_worker as worker
from tests.dist.test_bank_distributed import assert_same, load, run

pytestmark = pytest.mark.timeout(600)

REPLICATE = 2  # levels 1 and 2 (4 and 12 rows) and the generic row replicated; level 3 sharded
OPTIMIZER_STATE = ("master", "exp_avg", "exp_avg_sq", "step")


def one_process(steps: int, dtype: str, first: int = 0, resume=None) -> dict:
    """The reference: the worker's bank trained in this process, a world of one."""
    bank, _ = worker.make_bank("gather", 0, dtype, world=1)
    if resume is not None:
        state = {"bank": bank.load_template()}
        dcp.load(state, checkpoint_id=str(resume), no_dist=True)
        bank.load_state_dict(state["bank"])
    for step in range(first, first + steps):
        worker.train_step(bank, step, 1, None, generic=True)
    return worker.live_state(bank)


def replicated_tables() -> dict[str, int]:
    """Table name -> rows, for the tables REPLICATE keeps on every rank."""
    nodes = level_nodes(worker.BRANCHING)
    return {**{f"level{i + 1}": nodes[i] for i in range(REPLICATE)}, "generic": 1}


def assert_ranks_hold_their_slices(reference: dict, dump, world: int, what: str, tables=None) -> None:
    """Every rank: the whole stored table as one process has it, optimizer state for its chunk rows only;
    a table with fewer rows than ranks (the generic row) is cut into equal pieces of rows, a chunk of them each."""
    for rank in range(world):
        local = torch.load(dump / f"rank{rank}.pt")
        for table, rows in (tables or replicated_tables()).items():
            numel = reference[f"{table}.weight"][0].numel()
            pieces = pieces_per_row(rows, numel, world)
            assert pieces == 1 or rows < world
            start, stop = chunk_rows(rows * pieces, world, rank)
            expect = {f"{table}.weight": reference[f"{table}.weight"]}
            for key in (f"{table}.{f}" for f in OPTIMIZER_STATE if f"{table}.{f}" in reference):
                state = reference[key]
                if pieces > 1:  # a row's pieces share its step count
                    state = state.repeat_interleave(pieces) if state.dim() == 1 else state.reshape(rows * pieces, -1)
                expect[key] = state[start:stop]
            assert_same(expect, {key: local[key] for key in expect}, f"{what}, rank {rank}")


def test_replicated_tables_keep_optimizer_state_for_their_own_rows_and_train_as_one_process(tmp_path):
    reference = one_process(4, "bf16")
    level2 = replicated_tables()["level2"]
    for rank in range(3):  # on 3 ranks too every rank updates level-2 rows, some steps more than others
        start, stop = chunk_rows(level2, 3, rank)
        assert reference["level2.step"][start:stop].sum() > 0
    moment_bytes = {}  # world size -> the most bytes of level 2's moments and masters any rank holds
    for world in (2, 3):
        out = run(tmp_path, f"on{world}", world, "gather", REPLICATE, steps=4, dtype="bf16",
                  dump=tmp_path / f"dump{world}")
        assert_same(reference, load(out, torch.bfloat16), f"{world} ranks, saved")
        assert_ranks_hold_their_slices(reference, tmp_path / f"dump{world}", world, f"{world} ranks")
        dumps = [torch.load(tmp_path / f"dump{world}" / f"rank{r}.pt") for r in range(world)]
        moment_bytes[world] = max(sum(d[f"level2.{f}"].nbytes for f in ("master", "exp_avg", "exp_avg_sq"))
                                  for d in dumps)
    row_bytes = reference["level2.exp_avg"][0].nbytes
    for world, held in moment_bytes.items():
        assert held == 3 * row_bytes * -(-level2 // world), world  # fp32 master + 2 moments of ceil(N/W) rows
        assert held * world == 3 * reference["level2.exp_avg"].nbytes, world  # 12 rows: exactly 1/W


def test_sharded_optimizer_state_resumes_on_three_ranks_and_on_one(tmp_path):
    straight = one_process(4, "bf16")
    half = run(tmp_path, "half", 2, "gather", REPLICATE, steps=2, dtype="bf16")
    on3 = run(tmp_path, "on3", 3, "owner", REPLICATE, steps=2, start=2, resume=half, dtype="bf16",
              dump=tmp_path / "dump3")
    assert_same(straight, load(on3, torch.bfloat16), "bf16, 2 -> 3 ranks")
    # owner placement in groups of one rank: only the generic row stays on every rank; the levels
    # REPLICATE names are each rank's own subtrees' rows, whole with their state (nothing to reduce)
    assert_ranks_hold_their_slices(straight, tmp_path / "dump3", 3, "2 -> 3 ranks", {"generic": 1})
    owner = assign_groups(worker.TOKENS, 3)
    assert owner.group_size == 1
    for rank in range(3):
        local = torch.load(tmp_path / "dump3" / f"rank{rank}.pt")
        for level, rows in enumerate(level_nodes(worker.BRANCHING)[:REPLICATE]):
            mine = by_subtree(rows, worker.BRANCHING[0], owner.group_of_subtree, 3, rank).local_rows
            assert 0 < len(mine) < rows
            for field in ("weight", *OPTIMIZER_STATE):
                key = f"level{level + 1}.{field}"
                assert_same({key: straight[key][mine]}, {key: local[key]}, f"2 -> 3 ranks, rank {rank}")
    assert_same(straight, one_process(2, "bf16", first=2, resume=half), "bf16, 2 -> 1 rank")
