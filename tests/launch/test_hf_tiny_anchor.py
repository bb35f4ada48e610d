"""launch/hf_tiny_anchor.py: the random Llama behind docs/results.md's post-hoc run is a directory that
`transformers` and hmtrain's `data.tokenizer=hf` both read, its EOT and padding the tokenizer's own."""
import gzip
import importlib.util
import json
from pathlib import Path

from hmtrain.data.tokenizer import EOT_TOKEN, PAD_TOKEN, model_tokenizer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "hf_tiny_anchor.py"


def build(tmp_path: Path, capsys, *args: str) -> tuple[int, str, str]:
    """The script's main() in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("hf_tiny_anchor", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--documents", str(tmp_path / "docs.jsonl.gz"), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_anchor_directory_loads_with_its_own_tokenizer(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    texts = [f"Person {i} was born in city {i % 7} and works for company {i % 5}." for i in range(200)]
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    out = tmp_path / "anchor"
    code, stdout, stderr = build(tmp_path, capsys, "--out", str(out), "--d", "64", "--layers", "2", "--vocab", "400")
    assert code == 0, stderr
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = model_tokenizer(out)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == tokenizer.vocab_size <= 400
    assert tokenizer.decode([tokenizer.eot_id]) == EOT_TOKEN and tokenizer.decode([tokenizer.pad_id]) == PAD_TOKEN
    assert tokenizer.decode(tokenizer.encode(texts[3])) == texts[3]
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in stdout

    code, _, stderr = build(tmp_path, capsys, "--out", str(out))
    assert code == 2 and "--out" in stderr  # an existing directory is refused
    code, _, stderr = build(tmp_path, capsys, "--out", str(tmp_path / "odd"), "--d", "96")
    assert code == 2 and "--d: 96" in stderr
