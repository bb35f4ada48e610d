"""`hmtrain info`: bytes per rank for anchor, bank rows, optimizer state, transients, activations, NCCL and
traffic, a checkpoint's size and write time, and what eval needs, by hand and against what the states hold."""
import numpy as np
import pytest
import torch
from rich.console import Console

from hmtrain.cli import main
from hmtrain.config import ConfigError, ModelConfig, OptimConfig, load_config, split_global_batch
from hmtrain.info import anchor_bytes_per_rank, anchor_checkpoint_bytes, nccl_buffer_bytes, print_info
from hmtrain.memory.bank import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.memory.sizes import bank_checkpoint_bytes, eval_footprint, rank_footprint, step_transients
from hmtrain.model import count_parameters
from hmtrain.model.sizes import activation_bytes
from hmtrain.model.transformer import Transformer
from hmtrain.parallel.torch_engine import TorchEngine


def test_rank_footprint_by_hand():
    # 2 levels: 4 nodes x 2 units (replicated), 16 nodes x 1 unit (sharded over 4 ranks); 1 layer, d 8
    f = rank_footprint(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], world_size=4,
                       replicate_levels=1, generic=False, weight_bytes=2, micro_batch=2, global_batch=8)
    row0, row1 = 3 * 8 * 2, 3 * 8 * 1  # parameters per row of each level
    assert f.weights == (4 * row0 + 4 * row1) * 2  # all of level 0, a quarter of level 1, in bf16
    # ZeRO-1: the replicated level's fp32 masters, moments and step counts for its own chunk row only
    assert f.masters == (1 * row0 + 4 * row1) * 4
    assert f.optimizer == 1 * (row0 * 8 + 8) + 4 * (row1 * 8 + 8)  # fp32 moments + an int64 step per row
    assert f.step_grads == (4 * row0 + 4 * row1) * 4  # at most min(rows, global batch) rows, fp32
    assert f.fetched == (2 * row0 + 2 * row1) * (2 + 4)  # a micro-batch's bf16 rows and their fp32 gradients
    fp32 = rank_footprint(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], world_size=4,
                          replicate_levels=1, generic=False, weight_bytes=4, micro_batch=2, global_batch=8)
    assert fp32.masters == 0 and fp32.weights == 2 * f.weights  # an fp32 bank is its own master
    # gather placement: level 0 by ZeRO-1 (its touched rows, of 4, by 8 sequences a step: fp32 gradients
    # reduce-scattered and bf16 rows all-gathered, 3/4 of each sent and as much received) and level 1's rows
    # from their owners (3/4 of a micro-batch's distinct rows, bf16 in and fp32 gradients out, both ways)
    touched = 4 * (1 - (3 / 4) ** 8)
    remote = 16 * (1 - (15 / 16) ** 2) * 3 / 4
    assert f.moved_gather == pytest.approx(2 * 3 / 4 * touched * row0 * (4 + 2) + 2 * remote * row1 * (2 + 4),
                                           abs=2)
    assert fp32.moved_gather == pytest.approx(2 * 3 / 4 * touched * row0 * 8 + 2 * remote * row1 * 8, abs=2)
    # owner placement in 4 groups of one rank: every level's rows with their subtree's rank, nothing moves
    assert f.moved_owner == fp32.moved_owner == 0
    # in 2 groups of 2: level 0 kept whole in each group (2 rows), ZeRO-1 between its 2 ranks over its 4
    # sequences; level 1's rows from the group's other rank (1/2 of a micro-batch's distinct rows of 8)
    kw = dict(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], world_size=4, replicate_levels=1,
              generic=False, weight_bytes=2, micro_batch=2, global_batch=8, group_size=2, placement="owner")
    even, two = rank_footprint(**kw, routed=False), rank_footprint(**kw)
    in_group = 2 * (1 - (1 / 2) ** 4)
    zero = 2 * 1 / 2 * in_group * row0 * (4 + 2)
    remote = 8 * (1 - (7 / 8) ** 2) / 2
    assert even.moved_owner == pytest.approx(zero + 2 * remote * row1 * (2 + 4), abs=2)
    # routed (the loader sends a sequence to the rank storing its level-1 row while it has room): a group's 4
    # sequences, X of them on rank 0's 4 nodes of 8, X ~ Binomial(4, 1/2); each rank runs 2, so a rank storing
    # x > 2 sends x - 2 away, and their distinct rows of its 4 move (rows one way, gradients back)
    sent = 4 / 16 * 4 * (1 - 3 / 4) + 1 / 16 * 4 * (1 - (3 / 4) ** 2)
    assert two.moved_owner == pytest.approx(zero + 2 * sent * row1 * (2 + 4), abs=2)
    assert two.moved_owner < even.moved_owner
    assert two.weights == (2 * row0 + 4 * row1) * 2  # the group's half of level 0, a quarter of level 1
    assert two.masters == (1 * row0 + 4 * row1) * 4  # one of the group's 2 rows of level 0 per rank


def test_anchor_bytes_by_engine():
    assert anchor_bytes_per_rank(1000, 4, "fsdp", 2) == 4000  # 16 bytes a parameter, sharded
    assert anchor_bytes_per_rank(1000, 4, "deepspeed", 1) == 4 * 1000 + 12 * 1000 // 4
    assert anchor_bytes_per_rank(1000, 4, "deepspeed", 3) == 16 * 1000 // 4


def test_paper_160m_fits_on_8_gpus_and_the_table_says_so():
    console = Console(record=True, width=200)
    summary = print_info(load_config("paper-160m"), console, world_size=8)
    per_rank = summary["per_rank"]
    assert summary["anchor"] == 163_510_016 and summary["bank"] == 4_624_220_160
    assert per_rank["total"] < 80 * 2**30  # what issue 7 asks: the per-rank footprint fits an 80 GB GPU
    text = console.export_text()
    assert "memory per rank on 8 rank(s)" in text
    assert f"{per_rank['total'] / 2**30:.2f}" in text
    one = print_info(load_config("paper-160m"), Console(file=open("/dev/null", "w")), world_size=1)["per_rank"]
    assert one["total"] > 4 * per_rank["total"]  # sharding is what makes it fit
    assert per_rank["moved_gather"] > per_rank["moved_owner"]


@pytest.mark.parametrize("preset", ["paper-410m", "paper-1.4b"])
def test_larger_presets_report_per_rank_totals(preset):
    summary = print_info(load_config(preset), Console(file=open("/dev/null", "w")), world_size=64)
    assert 0 < summary["per_rank"]["total"] < 80 * 2**30


def test_eval_footprint_by_hand():
    # 4 nodes x 2 units, 16 nodes x 1 unit, the generic row of 3 units; 1 layer, d 8; a batch of 8 sequences
    f = eval_footprint(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], generic=True,
                       weight_bytes=2, batch=8)
    row0, row1, generic = 3 * 8 * 2, 3 * 8 * 1, 3 * 8 * 3
    assert f.weights == (4 * row0 + 16 * row1 + generic) * 2  # every row once, in bf16: no moments
    assert f.fetched == (4 * row0 + 8 * row1 + generic) * 2  # a level gives at most its nodes, or one per sequence
    assert f.largest_table == 16 * row1 * 2


@pytest.mark.parametrize("preset", ["paper-160m", "paper-410m", "paper-1.4b"])
def test_eval_of_the_paper_presets_fits_one_80gb_gpu(preset):
    console = Console(record=True, width=200)
    summary = print_info(load_config(preset), console)
    needs = summary["eval"]
    assert needs["bank_weights"] == 2 * (summary["bank"] + summary["fetched"])  # bf16 levels + generic row
    assert needs["device"] == 4 * summary["anchor"] + needs["fetched"] < 80 * 2**30
    assert needs["host"] < summary["per_rank"]["total"]  # less than training holds on one rank
    text = console.export_text()
    assert "eval / generate --checkpoint on one process" in text and f"{needs['device'] / 2**30:.2f}" in text


def test_step_transients_by_hand():
    # the tree above on 4 ranks, gather placement: level 0 replicated (4 rows of 48 parameters), level 1
    # fetched from owners (16 rows of 24, 4 per rank); bf16 rows, micro-batches of 2, global batch 8
    kw = dict(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], world_size=4, replicate_levels=1,
              generic=False, weight_bytes=2, micro_batch=2, global_batch=8)
    t = step_transients(**kw, placement="gather")
    # level 0: index_select's copy of 2 rows; level 1: 4 requesters x 2 rows served and their cat, 2 rows
    # received and their per-table cat, in bf16
    assert t.fetch == 2 * 48 * 2 + 2 * (4 * 2 + 2) * 24 * 2
    assert t.grad_return == (2 * 2 + 4 * 2) * 24 * 4  # 2 rows' fp32 slices and their cat, 8 rows received
    assert t.grad_concat == 4 * 48 * 4  # every row of the replicated level, fp32, concatenated to all-reduce
    owner = step_transients(**kw, placement="owner")  # level 1 read locally too: nothing returned over the network
    assert (owner.fetch, owner.grad_return, owner.grad_concat) == (2 * 48 * 2 + 2 * 24 * 2, 0, 4 * 48 * 4)
    assert step_transients(**(kw | {"world_size": 1}), placement="gather").grad_concat == 0  # no all-reduce


SMALL = ModelConfig(vocab_size=10, d_model=8, n_layers=3, n_heads=2, head_dim=4, ffn_hidden=16)


def test_activation_estimate_by_hand():
    kw = dict(micro_batch=2, seq_len=5, memory_units=3, fetched=100, value_bytes=2)
    # per layer and token: fp32 norm inputs and outputs over d, d, q, q and RoPE's copy of q and k, 8 bytes
    # each (8 x (8 + 8 + 8 + 8 + 8) = 320); bf16 d + 5q + d + 4 (16 + 3) values (2 x 132 = 264); a
    # log-sum-exp per head (2 x 4 = 8): 592 bytes, x 10 tokens = 5,920 per layer
    layer = 10 * (8 * (8 + 8 + 8 + 8 + 8) + 2 * (8 + 5 * 8 + 8 + 4 * 19) + 4 * 2)
    blocks = 2 * 100 * 2  # each sequence's fetched blocks, bf16
    head = 10 * 8 * 2 + 10 * 8 * 4 + 10 * 10 * (4 + 2)  # hidden-state gradient, fp32 head gradient, logits
    assert activation_bytes(SMALL, **kw, checkpointing=False) == 3 * layer + blocks + head == 19_240
    # checkpointing: each layer keeps its bf16 input, backward recomputes one layer
    assert activation_bytes(SMALL, **kw, checkpointing=True) == 3 * 10 * 8 * 2 + layer + blocks + head == 7_880


def _saved_bytes(cfg: ModelConfig, batch: int, seq_len: int, units: tuple, checkpointing: bool) -> int:
    """Bytes of the tensors autograd saves in a bf16 forward with memory, beside parameters and bank rows."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=seq_len).to(torch.bfloat16)
    if checkpointing:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    bank = MemoryBank(n_layers=cfg.n_layers, kind=SwiGLUUnits(d_model=cfg.d_model), branching=(4, 2), units=units,
                      dtype=torch.bfloat16)
    paths = np.array([[i % 4, i % 4 * 2 + i // 4 % 2] for i in range(batch)])
    memory = bank.fetch(bank.plan_step([(paths, None)]), 0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, memory=memory, labels=tokens)
    held = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *memory.rows.values()]}
    return sum(n for ptr, n in saved.items() if ptr not in held)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_activation_estimate_matches_what_autograd_saves(qk_norm):
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=2, head_dim=32, ffn_hidden=256, qk_norm=qk_norm)
    kw = dict(micro_batch=4, seq_len=128, memory_units=12, fetched=2 * 3 * 64 * 12, value_bytes=2)
    logits = 512 * 300 * (4 + 2)  # one chunk's logits: freed inside the forward, so never saved
    plain = _saved_bytes(cfg, 4, 128, (8, 4), checkpointing=False)
    assert activation_bytes(cfg, **kw, checkpointing=False) - logits == pytest.approx(plain, rel=0.1)
    # checkpointing saves each layer's input; the estimate adds the one layer backward recomputes
    checkpointed = _saved_bytes(cfg, 4, 128, (8, 4), checkpointing=True)
    assert checkpointed < activation_bytes(cfg, **kw, checkpointing=True) - logits < plain


def test_nccl_buffers_by_hand():
    mib = 2**20
    assert nccl_buffer_bytes(1, "gather") == 0  # one process: no NCCL
    assert nccl_buffer_bytes(8, "owner") == 4 * mib * 16 * 2  # ring collectives: 16 channels x 2 neighbours
    assert nccl_buffer_bytes(8, "gather") == 4 * mib * (16 * 2 + 2 * 7)  # + 2 channels to each other rank


def test_checkpoint_sizes_are_what_the_states_hold():
    """The bank's checkpoint bytes are exactly its state dict's; the anchor's, what TorchEngine's holds
    after a step (fp32 weights, the tied embedding twice, and two moments; AdamW's step counts aside)."""
    kind = SwiGLUUnits(d_model=8)
    for dtype, weight_bytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        bank = MemoryBank(n_layers=2, kind=kind, branching=(4, 2), units=(3, 2), generic=True, dtype=dtype)
        stored = sum(t.numel() * t.element_size() for t in bank.state_dict().values())
        assert bank_checkpoint_bytes(n_layers=2, params_per_unit=3 * 8, branching=[4, 2], units=[3, 2], generic=True,
                                     weight_bytes=weight_bytes) == stored
    # by hand: (4 x 72 + 8 x 48 + 1 x 120) parameters x 14 bytes (bf16) + 13 rows x 8
    assert bank_checkpoint_bytes(n_layers=2, params_per_unit=24, branching=[4, 2], units=[3, 2], generic=True,
                                 weight_bytes=2) == (4 * 2 * 24 * 3 + 8 * 2 * 24 * 2 + 2 * 24 * 5) * 14 + 13 * 8
    model = Transformer(SMALL, max_seq_len=8)
    engine = TorchEngine(model, OptimConfig(), torch.device("cpu"))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    engine.step(1e-3, torch.ones(()), 0.0)
    state = engine.state_dict()
    held = sum(t.numel() * t.element_size() for part in ("model", "optim") for t in _tensors(state[part]))
    steps = 4 * len(list(model.parameters()))  # AdamW's fp32 step count per parameter tensor
    tied = SMALL.vocab_size * SMALL.d_model
    assert anchor_checkpoint_bytes(count_parameters(SMALL), tied, "fsdp", 2) == held - steps
    assert anchor_checkpoint_bytes(1000, 100, "deepspeed", 2) == 2 * 2 * 1100 + 12 * 1000  # DCP + model file + ZeRO


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def _info(world_size: int, *overrides: str, **kw) -> tuple[dict, str]:
    console = Console(record=True, width=250)
    summary = print_info(load_config("paper-160m", list(overrides)), console, world_size=world_size, **kw)
    return summary, console.export_text()


def test_owner_placement_beyond_k1_ranks_reports_its_groups_traffic():
    """Past k_1 = 16 ranks owner placement runs in groups (64 ranks: 16 groups of 4); its traffic adds the deep
    rows a group's ranks fetch from each other, what gather moves over the group's nodes and ranks only, and the
    replicated level's ZeRO-1 among the group's ranks (with groups of one it stays with its rank)."""
    at16, text = _info(16)
    assert "owner placement, 16 group(s) of 1 rank(s)" in text and at16["per_rank"]["owner_groups"] == (16, 1)
    at64, text = _info(64)
    assert "owner placement, 16 group(s) of 4 rank(s)" in text and "not possible" not in text
    cfg = load_config("paper-160m")
    kw = dict(n_layers=cfg.model.n_layers, params_per_unit=3 * cfg.model.d_model, branching=cfg.tree.branching,
              units=cfg.memory.units, replicate_levels=cfg.parallel.replicate_levels, generic=cfg.memory.generic,
              weight_bytes=2 if cfg.memory.dtype == "bf16" else 4, micro_batch=cfg.train.micro_batch_size,
              global_batch=cfg.train.global_batch_size)
    alone = rank_footprint(world_size=64, group_size=1, **kw)  # the generic row's ZeRO-1 traffic only
    assert at64["per_rank"]["moved_owner"] == rank_footprint(world_size=64, group_size=4, **kw).moved_owner
    even = rank_footprint(world_size=64, group_size=4, routed=False, **kw).moved_owner
    assert at64["per_rank"]["moved_owner"] < even / 1.5  # the loader's routing keeps most rows at home
    deep = even - alone.moved_owner
    # by hand, the even cut: each sharded level's distinct rows in a micro-batch, over the group's 1/16 of the
    # nodes, 3/4 of them on the group's other ranks, rows in and fp32 gradients out, both ways, per micro-batch
    per_unit, micro, steps = cfg.model.n_layers * 3 * cfg.model.d_model, cfg.train.micro_batch_size, 1024 // 64 // 16
    expected = 0.0
    for level, (nodes, m) in enumerate(zip(np.cumprod(cfg.tree.branching), cfg.memory.units)):
        group_nodes = nodes / 16
        if m and level >= cfg.parallel.replicate_levels:
            distinct = group_nodes * (1 - (1 - 1 / group_nodes) ** micro)
            expected += 2 * distinct * 3 / 4 * per_unit * m * (kw["weight_bytes"] + 4) * steps
        elif m:  # kept whole in each group: ZeRO-1 among its 4 ranks over the rows the group's sequences touch
            touched = group_nodes * (1 - (1 - 1 / group_nodes) ** (cfg.train.global_batch_size / 16))
            expected += 2 * 3 / 4 * touched * per_unit * m * (kw["weight_bytes"] + 4)
    assert deep == pytest.approx(expected, rel=1e-6) and deep > 0
    assert at16["per_rank"]["moved_owner"] < at16["per_rank"]["moved_gather"]


def test_a_micro_batch_the_trainer_rejects_is_an_error_not_a_number():
    summary, text = _info(8)
    assert summary["per_rank"]["micro_batches"] == {"train.global_batch_size": 1024 // (8 * 16),
                                                    "train.pretrain_global_batch_size": 512 // (8 * 16)}
    summary, text = _info(3)
    with pytest.raises(ConfigError) as rejected:  # what the trainer stops with
        split_global_batch(1024, 3, micro_batch_size=16)
    assert summary["per_rank"]["micro_batches"]["train.global_batch_size"] == str(rejected.value)
    assert f"error: {rejected.value}" in " ".join(text.split())
    assert "micro-batches per rank per step (train.global_batch_size)" in text and "error (below)" in text


def test_peak_and_checkpoint_rows_add_up():
    summary, text = _info(8, "parallel.activation_checkpointing=true", checkpoint_gbps=2.0)
    per_rank, checkpoint = summary["per_rank"], summary["checkpoint"]
    configured = [v for k, v in per_rank.items() if k.startswith("activations") and k.endswith("(configured)")]
    copies = [v for k, v in per_rank.items() if k.startswith(("bank fetch copies", "bank gradient-return",
                                                             "replicated tables'"))]
    assert len(configured) == 1 and len(copies) == 3
    assert per_rank["peak"] == per_rank["total"] + max(*copies, *configured) + per_rank["nccl"]
    # the paper-160m bank: 4,624,220,160 + 18,063,360 generic parameters x 14 bytes (bf16) + 8 bytes a row
    rows = 16 + 256 + 4096 + 1
    assert checkpoint["bank"] == (4_624_220_160 + 18_063_360) * 14 + rows * 8
    tied = 50_432 * 512
    assert checkpoint["anchor"] == 12 * 163_510_016 + 4 * tied  # fp32 weights and moments, the tied embedding twice
    assert checkpoint["write_s"] == pytest.approx(checkpoint["total"] / 2e9)
    assert "write time at 2 GB/s (--checkpoint-gbps)" in text and f"{checkpoint['write_s']:.1f} s" in text


def test_checkpoint_gbps_must_be_positive(capsys):
    assert main(["info", "--config", "tiny", "--checkpoint-gbps", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("hmtrain info: error: --checkpoint-gbps must be a positive number of "
                                               "GB/s, got 0.0")


def test_owner_groups_store_their_own_level_1_rows_only():
    """64 ranks in 16 groups of 4 on paper-160m (level 1: 16 rows, replicated): under gather placement every
    rank stores all 16 rows, under owner placement its group's one; the deeper levels cost the same."""
    gather, _ = _info(64, "parallel.placement=gather")
    owner, _ = _info(64, "parallel.placement=owner")
    cfg = load_config("paper-160m")
    row = cfg.model.n_layers * 3 * cfg.model.d_model * cfg.memory.units[0] * 2  # bf16
    key = next(k for k in owner["per_rank"] if k.startswith("bank weights"))
    assert gather["per_rank"][key] - owner["per_rank"][key] == 15 * row


def test_fetching_once_per_step_counts_a_steps_distinct_rows_once():
    # level 1 (16 nodes, sharded over 4 ranks): 4 sequences a rank in 2 micro-batches of 2; level 0 replicated
    kw = dict(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], world_size=4, replicate_levels=1,
              generic=False, weight_bytes=2, micro_batch=2, global_batch=16)
    micro, step = rank_footprint(**kw), rank_footprint(**kw, fetch_per_step=True)
    row1 = 3 * 8

    def distinct(nodes, draws):
        return nodes * (1 - (1 - 1 / nodes) ** draws)

    saved = 2 * 3 / 4 * row1 * (2 + 4) * (2 * distinct(16, 2) - distinct(16, 4))  # sent + received, rows + grads
    assert micro.moved_gather - step.moved_gather == pytest.approx(saved, abs=2) and saved > 0
    assert step.fetched - micro.fetched == 4 * row1 * (2 + 4)  # the step's (at most 4) rows and their gradients


def test_a_replicated_row_shares_its_optimizer_state_in_pieces():
    # the one generic row (3 units x d 8 x 3 slots = 72 values) on 4 ranks: 4 pieces of 18, one per rank
    kw = dict(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], world_size=4, replicate_levels=0,
              weight_bytes=2, micro_batch=2, global_batch=8)
    alone, with_generic = rank_footprint(generic=False, **kw), rank_footprint(generic=True, **kw)
    assert with_generic.weights - alone.weights == 72 * 2  # the row itself on every rank
    assert with_generic.masters - alone.masters == 18 * 4  # its fp32 master: a quarter of it
    assert with_generic.optimizer - alone.optimizer == 18 * 8 + 8  # moments of the piece and its step count
