"""The bank `eval` and `generate --checkpoint` load: weights only, in the checkpoint's dtype, in host memory,
and every lookup and score equal to the training bank's, bit for bit."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from hmtrain.checkpoint.checkpointer import Checkpointer
from hmtrain.checkpoint.formats import FORMAT
from hmtrain.config import load_config, to_yaml
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.loading.loader import sequential_batches
from hmtrain.eval import loading
from hmtrain.eval.loading import load_trained, read_checkpoint
from hmtrain.eval.scoring import heldout_perplexity
from hmtrain.memory import build_bank, memory_sizes
from hmtrain.memory.kind import memory_kind
from hmtrain.model import Transformer, run_model_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_checkpoint"
TRAINED = FIXTURE / "run" / "checkpoints" / "step_00000015"  # format 1, fp32, five steps into the memory phase
MICRO = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_dim=16",
         "model.ffn_hidden=64", "memory.units=[8,4]", "tree.branching=[2,3]", "data.seq_len=64"]


def write_checkpoint(root: Path, dtype: str) -> Path:
    """A checkpoint as training writes it (weights and both moments), with random rows in every table."""
    cfg = load_config("tiny", [*MICRO, f"memory.dtype={dtype}"])
    model = Transformer(run_model_config(cfg.model, cfg.train.mode, cfg.train.dense_multiplier),
                        max_seq_len=cfg.data.seq_len)
    bank = build_bank(cfg)
    gen = torch.Generator().manual_seed(0)
    for table in bank.tables.values():
        table.copy_(torch.randn(table.shape, generator=gen))
    return Checkpointer(root).write(7, {"model": get_model_state_dict(model), "bank": bank.state_dict()},
                                    {"loader": {}, "format": FORMAT}, to_yaml(cfg))


@pytest.fixture(params=["fixture-fp32", "bf16"])
def checkpoint(request, tmp_path) -> Path:
    return TRAINED if request.param == "fixture-fp32" else write_checkpoint(tmp_path / "checkpoints", "bf16")


def training_bank(path: Path):
    """The bank as it was loaded for evaluation before: the whole training bank, moments and all."""
    _, _, cfg = read_checkpoint(path)
    bank = build_bank(cfg)
    state = {"bank": bank.load_template()}
    Checkpointer.load(path, state)
    bank.load_state_dict(state["bank"])
    return bank


def weight_bytes(cfg) -> int:
    """The bank's weights by the formula of docs/design.md, the generic row included."""
    levels = memory_sizes(n_layers=cfg.model.n_layers, params_per_unit=memory_kind(cfg).params_per_unit,
                          branching=cfg.tree.branching, units=cfg.memory.units)
    params = sum(level.bank_params for level in levels)
    params += sum(level.fetched_params for level in levels) if cfg.memory.generic else 0
    return params * {"fp32": 4, "bf16": 2}[cfg.memory.dtype]


def storages(obj) -> dict[int, int]:
    """Data pointer -> bytes of every tensor storage reachable from `obj` through hmtrain objects and containers."""
    found, seen = {}, set()

    def walk(x):
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for value in x.values():
                walk(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                walk(value)
        elif type(x).__module__.startswith("hmtrain") and hasattr(x, "__dict__"):
            walk(vars(x))

    walk(obj)
    return found


def test_eval_reads_and_holds_the_bank_weights_only(checkpoint, monkeypatch):
    asked = []
    real_load = loading.Checkpointer.load

    def recording_load(path, state):
        asked.extend(state.get("bank", {}))
        return real_load(path, state)

    monkeypatch.setattr(loading.Checkpointer, "load", staticmethod(recording_load))
    trained = load_trained(checkpoint)
    cfg = trained.cfg
    tables = {"level1", "level2", "generic"}
    assert sorted(asked) == sorted(f"{name}.weight" for name in tables)  # no exp_avg, exp_avg_sq or step read
    assert set(trained.bank.tables) == tables
    assert {t.dtype for t in trained.bank.tables.values()} == {build_bank(cfg).dtype}  # the checkpoint's dtype
    assert {t.device.type for t in trained.bank.tables.values()} == {"cpu"}
    assert sum(storages(trained.bank).values()) == weight_bytes(cfg)  # nothing else is held


def test_eval_bank_lookups_equal_the_training_banks_bit_for_bit(checkpoint):
    host, reference = load_trained(checkpoint).bank, training_bank(checkpoint)
    for name, table in reference.tables.items():
        assert host.tables[name].dtype == table.dtype and torch.equal(host.tables[name], table), name
    gen = np.random.default_rng(0)
    for batch in (1, 5, 9):
        top = gen.integers(0, 2, batch)
        paths = torch.from_numpy(np.stack([top, top * 3 + gen.integers(0, 3, batch)], 1))
        for generic in (torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool),
                        torch.from_numpy(gen.random(batch) < 0.4)):
            a, b = host.lookup(paths, generic), reference.lookup(paths, generic)
            assert a.rows.keys() == b.rows.keys()
            for name in a.rows:
                assert a.rows[name].dtype == b.rows[name].dtype and torch.equal(a.rows[name], b.rows[name]), name
            for i in range(2):
                for x, y in zip(a.layer(i), b.layer(i)):
                    assert torch.equal(x, y)


def test_heldout_scores_equal_the_training_banks_bit_for_bit():
    trained, reference = load_trained(TRAINED), training_bank(TRAINED)
    data = PreparedData.open(FIXTURE / "prepared")
    cpu = torch.device("cpu")
    for variant in ("fetched", "generic"):
        got = heldout_perplexity(trained.model, trained.bank, sequential_batches(data, "heldout", 8), variant, cpu)
        want = heldout_perplexity(trained.model, reference, sequential_batches(data, "heldout", 8), variant, cpu)
        assert got == want and got["tokens"] > 0, variant


def test_lookup_moves_only_the_routed_rows_to_the_device():
    from hmtrain.memory import HostBank

    loaded = load_trained(TRAINED).bank
    bank = HostBank(n_layers=2, kind=loaded.kind, branching=(2, 3), units=(8, 4), generic=True, dtype=torch.float32,
                    device="meta")  # a device that is not the host
    for name, table in bank.tables.items():
        table.copy_(loaded.tables[name])
    memory = bank.lookup(torch.tensor([[1, 5], [0, 2], [1, 5]]), torch.tensor([False, False, True]))
    assert {t.device.type for t in bank.tables.values()} == {"cpu"}
    assert {name: (r.device.type, r.shape[1]) for name, r in memory.rows.items()} == {
        "level1": ("meta", 2), "level2": ("meta", 2), "generic": ("meta", 1)}
