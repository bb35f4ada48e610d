"""`hmtrain info --tensor-parallel N`: the 2-D layout's per-rank arithmetic, by hand and against what the split
model holds and all-reduces (a one-process fake process group of 2 ranks: collectives are counted, not run),
and a bad degree as one line naming the key."""
import dataclasses
import io

import pytest
import torch
import torch.distributed as dist
from rich.console import Console
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from hmtrain.cli import main
from hmtrain.config import ConfigError, ModelConfig, load_config
from hmtrain.info import anchor_bytes_per_rank, print_info, tensor_parallel_rows
from hmtrain.memory import memory_layers
from hmtrain.memory.kind import FFNUnits
from hmtrain.model import count_parameters, lm_loss_sum
from hmtrain.model.sizes import activation_bytes, tensor_parallel_split, tensor_parallel_traffic
from hmtrain.model.transformer import Transformer
from hmtrain.parallel.tensor_parallel import apply_tensor_parallel

SMALL = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=32,
                    tie_embeddings=True, qk_norm=True)


@pytest.fixture
def tp_mesh():
    """A 2-rank tensor-parallel mesh in this process (torch's fake backend: collectives return at once)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def info(*overrides, world_size):
    return print_info(load_config("tiny", ["model.vocab_size=512", *overrides]), Console(file=io.StringIO()),
                      world_size=world_size)


@pytest.mark.parametrize("tied", [True, False])
def test_the_split_and_the_replicated_parameters_are_what_the_split_model_holds(tp_mesh, tied):
    cfg = dataclasses.replace(SMALL, tie_embeddings=tied)
    split, replicated = tensor_parallel_split(cfg)
    assert split + replicated == count_parameters(cfg)
    model = Transformer(cfg, max_seq_len=8)
    apply_tensor_parallel(model, tp_mesh)
    local = {True: 0, False: 0}  # sharded DTensor -> elements this rank holds
    for p in model.parameters():  # (a tied weight once)
        is_split = isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)
        local[is_split] += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    assert local == {True: split // 2, False: replicated}
    # the embedding and the head: split by rows over the vocabulary, a tied head the embedding's own DTensor
    for weight in (model.tok_embeddings.weight, model.output.weight):
        assert weight.placements == (Shard(0),) and weight.to_local().shape == (32, 16)
    assert (model.output.weight is model.tok_embeddings.weight) == tied


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_all_reduce_count_is_what_the_split_model_issues(tp_mesh, checkpointing):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = Transformer(SMALL, max_seq_len=8)
    apply_tensor_parallel(model, tp_mesh)
    if checkpointing:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    tokens = torch.randint(0, 64, (2, 8))
    with CommDebugMode() as comms:
        loss, _ = model(tokens, labels=tokens)
        loss.backward()
    counts = {str(op): n for op, n in comms.get_comm_counts().items()}
    traffic = tensor_parallel_traffic(SMALL, micro_batch=2, seq_len=8, value_bytes=4, checkpointing=checkpointing)
    # torch's styles' [B, T, d] all-reduces are functional collectives; hmtrain's own (QK-norm's, the loss's) not
    assert counts.get("c10d_functional.all_reduce", 0) == traffic.count - 1  # all but the head's input gradient
    assert counts.get("c10d.allreduce_", 0) == 1 + traffic.small_count  # it, QK-norm's sums, one loss chunk's two
    assert traffic.data_bytes == traffic.count * 2 * 8 * 16 * 4


def test_the_loss_all_reduces_twice_a_chunk_and_its_hidden_gradient_once(tp_mesh):
    weight = torch.nn.Parameter(distribute_tensor(torch.randn(64, 16), tp_mesh, [Shard(0)]))
    hidden = torch.randn(2, 8, 16, requires_grad=True)
    with CommDebugMode() as comms:
        lm_loss_sum(hidden, weight, torch.randint(0, 64, (2, 8)), chunk_tokens=5)  # 16 tokens: 4 chunks
    assert {str(op): n for op, n in comms.get_comm_counts().items()} == {"c10d.allreduce_": 2 * 4 + 1}
    traffic = tensor_parallel_traffic(SMALL, micro_batch=2, seq_len=8, value_bytes=4, checkpointing=False,
                                      chunk_tokens=5)
    assert traffic.small_count == 2 * 2 * 2 + 2 * 4  # QK-norm's q and k, forward and backward, per block


def anchor_row(rows: dict) -> int:
    return next(v for k, v in rows.items() if isinstance(k, str) and k.startswith("anchor ("))


def test_anchor_bytes_per_rank_halve_for_the_split_parts_at_2():
    one = info("train.memory_steps=0", world_size=1)
    two = info("train.memory_steps=0", "parallel.tensor_parallel=2", world_size=2)  # dp = 1 in both
    split, replicated = two["tensor_parallel"]["split"], two["tensor_parallel"]["replicated"]
    assert "tensor_parallel" not in one and one["anchor"] == split + replicated
    norms = 16 * replicated  # fsdp: 16 bytes a parameter (fp32 weight, gradient, two moments)
    assert anchor_row(two["tensor_parallel"]) - norms == (anchor_row(one["per_rank"]) - norms) // 2 == 8 * split
    four = info("train.memory_steps=0", "parallel.tensor_parallel=2", world_size=4)  # then FSDP over dp = 2
    assert four["tensor_parallel"]["dp"] == 2
    assert anchor_row(four["tensor_parallel"]) == anchor_bytes_per_rank(split // 2 + replicated, 2, "fsdp", 0) \
        == 8 * (split // 2 + replicated)


def test_activations_of_the_split_parts_are_divided_by_n():
    cfg = SMALL
    kwargs = dict(micro_batch=2, seq_len=8, memory_units=8, fetched=48, checkpointing=False, value_bytes=2)
    one, two = activation_bytes(cfg, **kwargs), activation_bytes(cfg, **kwargs, tensor_parallel=2)
    d, q, tokens, vocab = 16, 16, 16, 64
    # per layer and token, split: QK-norm's and RoPE's fp32 (8 x 3q), 5q + 4F (+ 4M) typed, 4 per head; per
    # micro-batch the fetched blocks; the head's fp32 gradient and a chunk's logits (V split)
    split_layers = 2 * tokens * (8 * 3 * q + 2 * (5 * q + 4 * 32 + 4 * 8) + 4 * 2)
    split_rest = 2 * 48 * 2 + vocab * d * 4 + tokens * vocab * (4 + 2)
    assert one - two == (split_layers + split_rest) // 2


def test_the_bank_per_rank_is_its_bytes_over_dp_times_n_for_sharded_levels():
    common = ["parallel.replicate_levels=0", "memory.generic=false", "parallel.placement=gather"]
    alone = info(*common, world_size=4)["per_rank"]
    two_d = info(*common, "parallel.tensor_parallel=2", world_size=4)["tensor_parallel"]
    held = next(v for k, v in two_d.items() if isinstance(k, str) and k.startswith("bank weights"))
    names = [k for k in alone if isinstance(k, str) and k.startswith(("bank weights", "bank fp32", "bank optimizer"))]
    assert held == sum(alone[k] for k in names)  # rows over 2 dp ranks, units over 2: as rows over 4
    # a replicated top level is whole on each dp rank and split N ways: half of what it is on 2 dp ranks alone
    rep = info("parallel.replicate_levels=2", "memory.generic=false", "memory.dtype=fp32", world_size=2)["per_rank"]
    rep_two_d = info("parallel.replicate_levels=2", "memory.generic=false", "memory.dtype=fp32",
                     "parallel.tensor_parallel=2", world_size=4)["tensor_parallel"]
    weights = next(k for k in rep if isinstance(k, str) and k.startswith("bank weights"))
    assert next(v for k, v in rep_two_d.items() if isinstance(k, str) and k.startswith("bank weights")) == (
        rep[weights] + rep["bank fp32 master rows (bf16 banks only; replicated: own rows)"]
        + rep["bank optimizer (fp32 moments + step; replicated: own rows)"]) // 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_memory_phase_all_reduce_count_is_what_the_split_ffn_with_units_issues(tp_mesh, checkpointing):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = Transformer(SMALL, max_seq_len=8, memory_layers=[1])  # units in one block of two
    apply_tensor_parallel(model, tp_mesh)
    if checkpointing:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    units = FFNUnits(torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 3, 16, requires_grad=True),
                     torch.randn(2, 16, 3, requires_grad=True))  # this rank's slice of each sequence's units
    tokens = torch.randint(0, 64, (2, 8))
    with CommDebugMode() as comms:
        loss, _ = model(tokens, labels=tokens, memory=SameUnits(units))
        loss.backward()
    counts = {str(op): n for op, n in comms.get_comm_counts().items()}
    traffic = tensor_parallel_traffic(SMALL, micro_batch=2, seq_len=8, value_bytes=4, checkpointing=checkpointing,
                                      memory_layers=1)
    plain = tensor_parallel_traffic(SMALL, micro_batch=2, seq_len=8, value_bytes=4, checkpointing=checkpointing)
    assert traffic.count == plain.count - 1 and traffic.small_count == plain.small_count
    # the block with units: TensorParallelFFN's own all-reduces (its output, its input's gradient once), not
    # the styles' functional ones (w_gate's and w_up's input gradients, w_down's output)
    assert counts.get("c10d_functional.all_reduce", 0) == traffic.count - 1 - 2
    assert counts.get("c10d.allreduce_", 0) == 1 + 2 + traffic.small_count
    assert units.u_gate.grad is not None and units.u_down.grad is not None


THREE = dataclasses.replace(SMALL, n_layers=3)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layers", [[0, 1, 2], [1, 2], [2], [1]])
def test_a_frozen_anchor_all_reduces_backward_only_from_its_lowest_block_with_units(tp_mesh, checkpointing, layers):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = Transformer(THREE, max_seq_len=8, memory_layers=layers)
    apply_tensor_parallel(model, tp_mesh)
    model.requires_grad_(False)  # train.anchor=frozen: only the units train
    if checkpointing:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    units = FFNUnits(torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 3, 16, requires_grad=True),
                     torch.randn(2, 16, 3, requires_grad=True))
    tokens = torch.randint(0, 64, (2, 8))
    with CommDebugMode() as comms:
        loss, _ = model(tokens, labels=tokens, memory=SameUnits(units, slots=len(layers)))
        loss.backward()
    issued = sum(comms.get_comm_counts().values())
    kwargs = dict(micro_batch=2, seq_len=8, value_bytes=4, checkpointing=checkpointing, memory_layers=len(layers))
    frozen = tensor_parallel_traffic(THREE, **kwargs, frozen_from=min(layers))
    cotrained = tensor_parallel_traffic(THREE, **kwargs)
    assert issued == frozen.count + frozen.small_count < cotrained.count + cotrained.small_count
    assert units.u_gate.grad is not None and units.u_down.grad is not None


def test_info_counts_a_frozen_anchors_memory_phase_from_its_lowest_block_with_units():
    common = ["memory.layers=[2,3]", "parallel.tensor_parallel=2", "train.global_batch_size=32"]
    frozen = wide_info("train.anchor=frozen", *common, world_size=4)[0]["tensor_parallel"]["memory_traffic"]
    cotrained = wide_info("train.anchor=cotrain", *common, world_size=4)[0]["tensor_parallel"]["memory_traffic"]
    # blocks 0 and 1 run no backward (3 all-reduces and QK-norm's 2 each); block 2 no input gradient (2, QK's 2)
    assert frozen.count == cotrained.count - (2 * 3 + 2)
    assert frozen.small_count == cotrained.small_count - (2 * 2 + 2)
    assert frozen.data_bytes * cotrained.count == cotrained.data_bytes * frozen.count


class SameUnits:
    """Fetched memory (the model's LayerMemory) whose `slots` layer slots all hold the same units."""

    def __init__(self, units: FFNUnits, slots: int = 1):
        self.units, self.slots = units, slots

    def layer(self, slot: int) -> FFNUnits:
        assert 0 <= slot < self.slots
        return self.units


def wide_info(*overrides, world_size) -> tuple[dict, str]:
    """print_info's result and its text, one table row a line."""
    console = Console(file=io.StringIO(), width=400)
    result = print_info(load_config("tiny", ["model.vocab_size=512", *overrides]), console, world_size=world_size)
    return result, console.file.getvalue()


@pytest.mark.parametrize("placement", ["gather", "owner"])
def test_info_counts_the_memory_phase_all_reduces_of_an_ffn_memory_and_notes_no_refusal(placement):
    result, out = wide_info(f"parallel.placement={placement}", "train.global_batch_size=32",
                            "parallel.tensor_parallel=2", world_size=4)
    counts = result["tensor_parallel"]
    layers = len(memory_layers(load_config("tiny", ["model.vocab_size=512"])))
    assert counts["refusal"] is None and layers > 0 and "note:" not in out and "refuses" not in out
    assert counts["memory_traffic"].count == counts["traffic"].count - layers  # one fewer per block with units
    assert counts["micro_batches"] == 1 and 0 < counts["memory_step_allreduce_bytes"] < counts["step_allreduce_bytes"]
    assert f"(train.global_batch_size, the anchor alone): 1 micro-batch(es) x ({counts['traffic'].count} of" in out
    assert f"per step, memory phase: 1 micro-batch(es) x ({counts['memory_traffic'].count} of [B, T, d]" in out


def test_a_note_gives_the_trainers_refusal_of_the_memory_and_dense_has_no_bank_rows(capsys):
    # a memory the trainer does not split over tensor-parallel ranks (a LoRA kind: refused with the split too)
    main(["info", "--config", "tiny", "--world-size", "4", "--tensor-parallel", "2", "model.vocab_size=512",
          "memory.kind=lora_ffn"])
    assert "tensor parallel 2 x data parallel 2" in capsys.readouterr().out
    result, out = wide_info("memory.kind=lora_ffn", "train.global_batch_size=32", "parallel.tensor_parallel=2",
                            world_size=4)
    lora = result["tensor_parallel"]
    assert lora["refusal"].startswith("config key 'memory.kind': memory.kind=lora_ffn is not split")
    assert f"the trainer refuses this kind's memory phase under tensor parallelism: {lora['refusal']}" in out
    assert lora["memory_traffic"] is None and "per step, memory phase" not in out
    anchor_only = info("train.memory_steps=0", "parallel.tensor_parallel=2", world_size=2)["tensor_parallel"]
    assert anchor_only["refusal"] is None  # nothing refused, nothing noted
    dense = info("train.mode=dense", "parallel.tensor_parallel=2", world_size=2)["tensor_parallel"]
    assert dense["refusal"] is None and not any(isinstance(k, str) and k.startswith("bank") for k in dense)


@pytest.mark.parametrize("world, overrides, words", [
    (3, ["parallel.tensor_parallel=2"], "world size 3 is not divisible by 2"),
    (6, ["parallel.tensor_parallel=3"], "model.n_heads=4 is not divisible by 3"),
    (2, ["parallel.tensor_parallel=2", "model.ffn_hidden=385"], "the FFN's 385 hidden units are not divisible"),
    (2, ["parallel.tensor_parallel=2", "memory.units=[64,31]"], r"memory.units \[64, 31\]: \[31\]"),
    (2, ["parallel.tensor_parallel=2", "model.vocab_size=301"], "the vocabulary of 301 rows"),
    (2, ["parallel.tensor_parallel=2", "parallel.engine=deepspeed"], "parallel.engine=fsdp"),
])
def test_a_bad_degree_is_one_line_naming_the_key_before_any_table(world, overrides, words):
    console = Console(file=io.StringIO())
    with pytest.raises(ConfigError, match=words) as error:
        print_info(load_config("tiny", ["model.vocab_size=512", *overrides]), console, world_size=world)
    assert str(error.value).startswith("config key 'parallel.tensor_parallel': ") and "\n" not in str(error.value)
    assert console.file.getvalue() == ""


def test_the_rows_use_the_dense_baseline_a_dense_run_trains():
    cfg = load_config("tiny", ["model.vocab_size=512", "train.mode=dense", "parallel.tensor_parallel=2"])
    rows, counts = tensor_parallel_rows(cfg, {"bank": 0, "fetched": 0, "memory_layers": (0,)}, 2)
    assert counts["split"] + counts["replicated"] > count_parameters(cfg.model)  # wider than the anchor
