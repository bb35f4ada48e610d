"""`hmtrain export` and `hmtrain generate` on a tiny trained run: the memory-mapped bank equals the
checkpoint's, lookups read only their rows, exports are crash-safe, generation is deterministic."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hmtrain.cli import main
from hmtrain.eval.loading import load_trained
from hmtrain.serve import export as export_module
from hmtrain.serve.export import Export, export_checkpoint
from hmtrain.serve.generate import from_checkpoint, from_export
from tests.e2e.conftest import run_cli

STEPS = ["train.pretrain_steps=2", "train.memory_steps=4", "train.checkpoint_every=2", "logging.mlflow=false"]
PROMPT = "She was born in the city of"


@pytest.fixture(scope="module")
def ctx(prepared, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    run_cli("train", "--config", "tiny", *prepared["overrides"], *STEPS, f"train.run_dir={run}", cwd=root)
    out = root / "exported"
    export_checkpoint(run, out)
    return {"root": root, "run": run, "export": out, "overrides": prepared["overrides"],
            "prepared": Path(prepared["root"]) / "prepared"}


def random_paths(n: int, branching=(2, 3), seed: int = 0) -> torch.Tensor:
    gen = np.random.default_rng(seed)
    top = gen.integers(0, branching[0], n)
    return torch.from_numpy(np.stack([top, top * branching[1] + gen.integers(0, branching[1], n)], 1))


def assert_same_memory(a, b, n_layers: int) -> None:
    assert a.rows.keys() == b.rows.keys()
    for name in a.rows:
        assert a.rows[name].dtype == b.rows[name].dtype and torch.equal(a.rows[name], b.rows[name]), name
    for i in range(n_layers):
        for x, y in zip(a.layer(i), b.layer(i)):
            assert torch.equal(x, y)


def test_export_round_trip_equals_the_checkpoint(ctx):
    trained = load_trained(ctx["run"])
    export = Export.open(ctx["export"], checksums=True)
    mapped = export.bank()
    assert export.step == trained.step == 6
    assert set(mapped.tables) == set(trained.bank.tables) == {"level1", "level2", "generic"}
    for name, table in trained.bank.tables.items():
        assert torch.equal(torch.from_numpy(np.array(mapped.tables[name])), table), name
    assert trained.bank.tables["level2"][:, :, 2].abs().sum() > 0, "the memory did not train"
    model = export.load_model()
    for (key, a), (_, b) in zip(trained.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), key
    # one path's row is one contiguous byte range at the recorded offset
    entry = export.manifest["bank"]["tables"]["level2"]
    raw = (ctx["export"] / entry["file"]).read_bytes()
    row = raw[entry["data_offset"] + 4 * entry["row_bytes"]:entry["data_offset"] + 5 * entry["row_bytes"]]
    assert torch.equal(torch.frombuffer(bytearray(row), dtype=torch.float32).view(2, 3, 4, 32),
                       trained.bank.tables["level2"][4])
    for seed in range(5):
        paths = random_paths(7, seed=seed)
        generic = torch.from_numpy(np.random.default_rng(seed).random(7) < 0.3)
        assert_same_memory(mapped.lookup(paths, generic), trained.bank.lookup(paths, generic), n_layers=2)
    all_generic, paths = torch.ones(3, dtype=torch.bool), random_paths(3)
    assert_same_memory(mapped.lookup(paths, all_generic), trained.bank.lookup(paths, all_generic), n_layers=2)


class Recording:
    """A table that records which rows are read from it."""

    def __init__(self, table):
        self.table, self.reads = table, []

    def __getitem__(self, ids):
        self.reads.append(np.array(ids, copy=True))
        return self.table[ids]


def test_lookup_reads_exactly_the_requested_rows(ctx, tmp_path):
    mapped = Export.open(ctx["export"]).bank()
    mapped.tables = {name: Recording(t) for name, t in mapped.tables.items()}
    paths = torch.tensor([[1, 5], [0, 2], [1, 5], [1, 3]])
    mapped.lookup(paths, torch.tensor([False, False, False, True]))
    reads = {name: t.reads for name, t in mapped.tables.items()}
    assert [r.tolist() for r in reads["level1"]] == [[0, 1]]
    assert [r.tolist() for r in reads["level2"]] == [[2, 5]]  # row 3 belongs to the generic sequence
    assert [r.tolist() for r in reads["generic"]] == [[0]]
    # and nothing else of the file matters: poison every other row on disk
    copy = tmp_path / "poisoned"
    shutil.copytree(ctx["export"], copy)
    level2 = np.load(copy / "bank" / "level2.npy", mmap_mode="r+")
    level2[[0, 1, 3, 4]] = np.nan
    level2.flush()
    del level2
    poisoned = Export.open(copy).bank().lookup(paths[:3])
    assert_same_memory(poisoned, Export.open(ctx["export"]).bank().lookup(paths[:3]), n_layers=2)


def test_export_reads_the_bank_one_table_at_a_time(ctx, tmp_path, monkeypatch):
    loads = []
    real_load = export_module.Checkpointer.load

    def recording_load(path, state):
        loads.append(sorted(state.get("bank", {})) + sorted(k for k in state if k != "bank"))
        return real_load(path, state)

    monkeypatch.setattr(export_module.Checkpointer, "load", staticmethod(recording_load))
    export_checkpoint(ctx["run"], tmp_path / "out")
    assert loads == [["level1.weight"], ["level2.weight"], ["generic.weight"], ["model"]]


def test_bf16_bank_is_stored_as_its_bit_patterns(ctx, tmp_path):
    run = tmp_path / "bf16"
    run_cli("train", "--config", "tiny", *ctx["overrides"], "train.pretrain_steps=1", "train.memory_steps=2",
            "train.checkpoint_every=3", "logging.mlflow=false", "memory.dtype=bf16", f"train.run_dir={run}",
            cwd=tmp_path)
    manifest = export_checkpoint(run, tmp_path / "out")
    assert manifest["bank"]["dtype"] == "bfloat16" and manifest["bank"]["storage_dtype"] == "<u2"
    assert np.load(tmp_path / "out" / "bank" / "level1.npy", mmap_mode="r").dtype == np.uint16
    trained, mapped = load_trained(run), Export.open(tmp_path / "out").bank()
    paths = random_paths(6, seed=3)
    generic = torch.tensor([True, False, False, True, False, False])
    memory = mapped.lookup(paths, generic)
    assert memory.rows["level1"].dtype == torch.bfloat16
    assert_same_memory(memory, trained.bank.lookup(paths, generic), n_layers=2)


def test_a_crash_before_the_rename_leaves_no_export(ctx, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(export_module, "replace_dir", crash)
    with pytest.raises(OSError, match="injected"):
        export_checkpoint(ctx["run"], out)
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    # the same crash while replacing an export leaves the old one whole
    monkeypatch.undo()
    export_checkpoint(ctx["run"] / "checkpoints" / "step_00000004", out)
    monkeypatch.setattr(export_module, "replace_dir", crash)
    with pytest.raises(OSError, match="injected"):
        export_checkpoint(ctx["run"], out, overwrite=True)
    assert Export.open(out, checksums=True).step == 4
    # a process killed mid-export (nothing cleans up) leaves only <out>.tmp, which is not an export
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    shutil.copytree(ctx["export"], tmp_path / "fresh.tmp")
    with pytest.raises(FileNotFoundError, match="unfinished export"):
        Export.open(fresh)
    export_checkpoint(ctx["run"], fresh)
    assert Export.open(fresh).step == 6 and not (tmp_path / "fresh.tmp").exists()


def test_generate_is_deterministic_and_the_same_from_checkpoint_and_export(ctx):
    base = ["generate", "--prompt", PROMPT, "--max-new-tokens", "12"]
    greedy = [run_cli(*base, "--export", str(ctx["export"]), cwd=ctx["root"]).stdout for _ in range(2)]
    assert greedy[0] == greedy[1]
    path_line, text = greedy[0].split("\n", 1)
    assert path_line.startswith("path: ") and path_line.endswith("(memory: fetched)")
    assert text.startswith(PROMPT) and len(text.rstrip("\n")) > len(PROMPT)
    assert run_cli(*base, "--checkpoint", str(ctx["run"]), cwd=ctx["root"]).stdout == greedy[0]
    sampled = [run_cli(*base, "--export", str(ctx["export"]), "--temperature", "1.0", "--top-k", "20", "--seed", "7",
                       cwd=ctx["root"]).stdout for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_memory_changes_the_logits(ctx):
    model = from_export(ctx["export"])
    ids = model.tokenizer.encode(PROMPT)
    path = model.route(PROMPT)
    model.tree.check_paths(path)  # raises unless a tree path
    assert path.shape == (1, 2)
    logits = {mode: model.next_logits(ids, model.memory_for(path, mode)) for mode in ("fetched", "generic", "none")}
    assert not torch.allclose(logits["fetched"], logits["none"])
    assert not torch.allclose(logits["fetched"], logits["generic"])
    from_ckpt = from_checkpoint(ctx["run"])
    assert torch.equal(from_ckpt.next_logits(ids, from_ckpt.memory_for(path, "fetched")), logits["fetched"])


def cli_error(capsys, *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_errors(ctx, tmp_path, capsys):
    exported, run = str(ctx["export"]), str(ctx["run"])
    assert "already exists" in cli_error(capsys, "export", "--checkpoint", run, "--out", exported)
    assert "reads" in cli_error(capsys, "export", "--checkpoint", run, "--out", str(ctx["run"] / "checkpoints"),
                                "--overwrite")
    assert "no such file" in cli_error(capsys, "export", "--checkpoint", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    gen = ["generate", "--export", exported]
    assert "--prompt is empty" in cli_error(capsys, *gen, "--prompt", "  ")
    assert "--max-new-tokens" in cli_error(capsys, *gen, "--prompt", "x", "--max-new-tokens", "0")
    assert "--temperature" in cli_error(capsys, *gen, "--prompt", "x", "--temperature", "nan")
    assert "--top-k" in cli_error(capsys, *gen, "--prompt", "x", "--top-k", "-1")
    assert "apply to --checkpoint only" in cli_error(capsys, *gen, "--prompt", "x", "data.prepared=/x")
    assert "no such directory" in cli_error(capsys, "generate", "--export", str(tmp_path / "nope"), "--prompt", "x")
    broken = tmp_path / "broken"
    shutil.copytree(ctx["export"], broken)
    table = broken / "bank" / "level2.npy"
    table.write_bytes(table.read_bytes()[:-100])
    err = cli_error(capsys, "generate", "--export", str(broken), "--prompt", "x")
    assert "bank/level2.npy" in err and "truncated" in err
    # a table truncated consistently with a forged manifest still fails to map
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"]["bank/level2.npy"]["bytes"] = table.stat().st_size
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert "level2.npy is truncated or not a .npy" in cli_error(capsys, "generate", "--export", str(broken),
                                                                "--prompt", "x")
    manifest["files"]["bank/level2.npy"] = 5
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert "files section" in cli_error(capsys, "generate", "--export", str(broken), "--prompt", "x")
    (broken / "manifest.json").unlink()
    assert "not an hmtrain export" in cli_error(capsys, "generate", "--export", str(broken), "--prompt", "x")
    (broken / "manifest.json").write_text("{")
    assert "not valid JSON" in cli_error(capsys, "generate", "--export", str(broken), "--prompt", "x")


def test_prepared_data_can_be_named_by_an_override(ctx, tmp_path, capsys):
    moved = tmp_path / "moved_prepared"
    shutil.copytree(ctx["prepared"], moved)
    manifest = export_checkpoint(ctx["run"], tmp_path / "out", overrides=[f"data.prepared={moved}"])
    assert manifest["source"]["prepared"] == str(moved.resolve())
    assert Export.open(tmp_path / "out").tree.branching == (2, 3)
    from_ckpt = from_checkpoint(ctx["run"], overrides=[f"data.prepared={moved}"])
    assert from_ckpt.generate(PROMPT, max_new_tokens=5).new_ids == \
        from_export(tmp_path / "out").generate(PROMPT, max_new_tokens=5).new_ids
    err = cli_error(capsys, "export", "--checkpoint", str(ctx["run"]), "--out", str(tmp_path / "o2"),
                    f"data.prepared={tmp_path / 'missing'}")
    assert "missing" in err and "manifest.json" in err and not (tmp_path / "o2").exists()
    err = cli_error(capsys, "generate", "--checkpoint", str(ctx["run"]), "--prompt", "x",
                    f"data.prepared={tmp_path / 'missing'}")
    assert "missing" in err and "manifest.json" in err


def test_generic_memory_is_refused_where_none_was_trained(ctx, tmp_path, capsys):
    copy = tmp_path / "nogeneric"
    shutil.copytree(ctx["export"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["bank"]["generic"] = False
    del manifest["bank"]["tables"]["generic"], manifest["files"]["bank/generic.npy"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "bank" / "generic.npy").unlink()
    assert "has no generic memory" in cli_error(capsys, "generate", "--export", str(copy), "--prompt", "x",
                                                "--memory", "generic")
    with pytest.raises(ValueError, match="without one"):
        Export.open(copy).bank().lookup(torch.tensor([[0, 1]]), torch.tensor([True]))
    assert main(["generate", "--export", str(copy), "--prompt", "x", "--max-new-tokens", "2"]) == 0


def test_a_dense_run_exports_without_a_bank(ctx, tmp_path, capsys):
    run = tmp_path / "dense"
    run_cli("train", "--config", "tiny", *ctx["overrides"], "train.mode=dense", "train.pretrain_steps=2",
            "train.memory_steps=2", "train.checkpoint_every=2", "logging.mlflow=false", f"train.run_dir={run}",
            cwd=tmp_path)
    manifest = export_checkpoint(run, tmp_path / "out")
    assert manifest["bank"] is None and not (tmp_path / "out" / "bank").exists()
    model = from_export(tmp_path / "out")
    result = model.generate(PROMPT, max_new_tokens=4, memory="none")
    assert len(result.new_ids) == 4 or result.stopped_at_eot
    assert "has no memory bank" in cli_error(capsys, "generate", "--export", str(tmp_path / "out"), "--prompt", "x")


def test_the_anchor_is_safetensors_readable_without_hmtrain(ctx):
    from safetensors import safe_open

    trained = load_trained(ctx["run"]).model.state_dict()
    manifest = json.loads((ctx["export"] / "manifest.json").read_text())
    with safe_open(str(ctx["export"] / "anchor.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        stored = {key: f.get_tensor(key) for key in f.keys()}
    assert json.loads(metadata["config"]) == manifest["model"]["config"]
    assert int(metadata["max_seq_len"]) == manifest["model"]["max_seq_len"]
    tied = manifest["model"]["config"]["tie_embeddings"]
    assert set(stored) == set(trained) - ({"output.weight"} if tied else set())
    for key, tensor in stored.items():
        assert torch.equal(tensor, trained[key]), key


def test_a_version_1_export_with_a_pickled_anchor_still_loads(ctx, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(ctx["export"], old)
    model = Export.open(old).load_model()
    (old / "anchor.safetensors").unlink()
    torch.save(model.state_dict(), old / "anchor.pt")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"], manifest["model"]["file"] = 1, "anchor.pt"
    assert manifest["model"].pop("family") == "lm"  # before version 3 an export held hmtrain's anchor alone
    manifest["files"] = export_module.record_files(old)
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = Export.open(old, checksums=True).load_model()
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key
    manifest["model"]["family"] = "moe"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="anchor of family 'moe'"):
        Export.open(old).load_model()
