"""Every benchmark lives in hmtrain/bench/ and runs from `hmtrain bench NAME`, with its own options."""
import importlib
import inspect

import pytest

from hmtrain.bench import NAMES
from hmtrain.cli import build_parser, main

EXPECTED = ("attention", "bank_backward", "bank_host", "bank_traffic", "export", "gpu_check", "loss", "memory_ffn",
            "memory_step", "placement", "prepare", "rank_scale", "train_ranks", "tree")


def test_the_benchmarks_are_the_modules_of_hmtrain_bench_each_with_main_of_argv():
    assert NAMES == EXPECTED
    for name in NAMES:
        module = importlib.import_module(f"hmtrain.bench.{name}")
        assert list(inspect.signature(module.main).parameters) == ["argv"], name


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ", ".join(EXPECTED) in out


def test_hmtrain_bench_runs_the_benchmark_with_its_options(capsys):
    rc = main(["bench", "bank_backward", "--layers", "2", "--d", "16", "--units", "4", "2", "--batch", "2",
               "--tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "layers 2, d 16, units [4, 2], batch 2 sequences x 3 tokens" in out and "bank (GatherBlocks)" in out


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_the_memory_step_benchmark_times_by_either_clock(capsys, clock):
    rc = main(["bench", "memory_step", "--tokens", "16", "--repeats", "2", "--warmup", "0", "--vocab", "64",
               "--clock", clock])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"16 tokens a step, 2 paired steps, {clock} clock" in out and "(co-trained)" in out


def test_the_memory_step_benchmark_times_each_part_of_both_steps(capsys):
    from hmtrain.bench.memory_step import PARTS

    rc = main(["bench", "memory_step", "--tokens", "16", "--repeats", "3", "--warmup", "1", "--vocab", "64",
               "--clock", "cpu", "--parts"])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and " | " in line}
    assert rc == 0 and all(name in rows for name in PARTS)
    medians = {name: float(rows[name][0]) for name in PARTS}
    assert all(value >= 0 for value in medians.values()) and medians["memory: backward"] > 0
    # the bank's own parts are all extra; forward is against the widened anchor's forward
    assert float(rows["bank: plan and fetch"][1].rstrip(" |")) == pytest.approx(medians["bank: plan and fetch"],
                                                                                 abs=0.01)
    forward = float(rows["memory: forward"][1].rstrip(" |"))
    assert forward == pytest.approx(medians["memory: forward"] - medians["widened: forward"], abs=0.02)


def test_an_unknown_benchmark_is_refused():
    with pytest.raises(SystemExit) as exc_info:
        build_parser().parse_args(["bench", "nonesuch"])
    assert exc_info.value.code == 2


def test_the_export_benchmarks_checkpoint_loads_for_eval(tmp_path):
    import argparse

    from hmtrain.bench.export import make_checkpoint
    from hmtrain.eval.loading import load_trained

    path, sizes = make_checkpoint(tmp_path, argparse.Namespace(units=[8, 4], branching=[2, 2], d=16, layers=1))
    assert {name: table.nbytes for name, table in load_trained(path).bank.tables.items()} == sizes


def test_the_ffn_benchmark_has_the_widened_anchor_ffn_as_a_row(capsys):
    import torch

    from hmtrain.bench.memory_ffn import make_inputs, widened_ffn

    inputs = make_inputs(2, 5, 8, 12, 3, torch.float32, "cpu")
    fwd, fwd_bwd = widened_ffn(inputs, 3)
    assert fwd().shape == (2, 5, 8)
    # the input's gradient and the three widened weights', h + M = 15 units each
    assert [tuple(g.shape) for g in fwd_bwd()] == [(2, 5, 8), (15, 8), (15, 8), (8, 15)]
    assert main(["bench", "memory_ffn", "--device", "cpu", "--quick", "--presets", "tiny"]) == 0
    rows = [line.split()[1:4] for line in capsys.readouterr().out.splitlines() if line.startswith("tiny ")]
    assert rows[1] == ["widened", "FFN", "(torch)"]  # after torch eager
