"""`memory.layers=late` through the CLI: the run trains a bank of the late layers only, a resume with other
memory layers is refused, and an export puts the memory on the same layers (the same logits as in-process)."""
import json

import torch

from hmtrain.eval.loading import load_trained
from hmtrain.serve.export import Export, export_checkpoint
from hmtrain.serve.generate import from_checkpoint, from_export
from tests.e2e.conftest import run_cli

STEPS = ["train.pretrain_steps=2", "train.memory_steps=2", "train.checkpoint_every=2", "train.memory_optim.lr=3e-2",
         "logging.mlflow=false"]
LATE = ["model.n_layers=6", "memory.layers=late"]  # layers 4 and 5
PROMPT = "She was born in the city of"


def test_late_memory_trains_refuses_other_layers_on_resume_and_exports(prepared, tmp_path):
    args = ["--config", "tiny", *prepared["overrides"], *STEPS, f"train.run_dir={tmp_path / 'run'}"]
    run_cli("train", *args, *LATE, cwd=tmp_path)
    trained = load_trained(tmp_path / "run")
    assert trained.model.memory_layers == (4, 5)
    assert {name: tuple(t.shape[1:3]) for name, t in trained.bank.tables.items()} == \
        {"level1": (2, 3), "level2": (2, 3), "generic": (2, 3)}  # [rows, 2 layers, gate/up/down, m, d]

    refused = run_cli("train", *args, "model.n_layers=6", "memory.layers=all", "train.memory_steps=4", "--resume",
                      cwd=tmp_path, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "memory.layers: 'late' -> 'all'" in refused.stderr, refused.stderr

    export_checkpoint(tmp_path / "run", tmp_path / "exported")
    bank = json.loads((tmp_path / "exported" / "manifest.json").read_text())["bank"]
    assert bank["layers"] == [4, 5] and bank["n_layers"] == 2
    assert Export.open(tmp_path / "exported").load_model().memory_layers == (4, 5)
    exported, checkpoint = from_export(tmp_path / "exported"), from_checkpoint(tmp_path / "run")
    ids, path = exported.tokenizer.encode(PROMPT), exported.route(PROMPT)
    fetched = exported.next_logits(ids, exported.memory_for(path, "fetched"))
    assert torch.equal(fetched, checkpoint.next_logits(ids, checkpoint.memory_for(path, "fetched")))
    with torch.no_grad():  # in-process: the trained model and bank as evaluation loads them
        tokens = torch.tensor([ids])
        in_process = trained.model(tokens, memory=trained.bank.lookup(path))[0, -1]
    assert torch.equal(fetched, in_process)
    assert not torch.allclose(fetched, exported.next_logits(ids, exported.memory_for(path, "none")))
