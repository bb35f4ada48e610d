"""`hmtrain study` prepares data once per distinct data/tree setting among its arms, and reuses it on a rerun."""
import io
from pathlib import Path

from rich.console import Console

from hmtrain.study import runner
from hmtrain.study.spec import check_configs, load_spec

SPEC = """name: sharing
base:
  config: tiny
  overrides: [data.documents=docs.jsonl, data.embedder=hashing]
arms:
  - {name: ffn, overrides: [memory.kind=ffn]}
  - {name: lora, overrides: [memory.kind=lora_ffn, train.memory_steps=7]}
  - {name: short, overrides: [data.seq_len=128]}
  - {name: shallow, overrides: ["tree.branching=[4]", "memory.units=[8]"]}
seeds: [0]
"""


def test_arms_share_prepared_data_unless_a_data_key_differs(tmp_path, monkeypatch):
    calls = []

    def prepare(cfg):  # stands in for the real one: records where, and leaves a finished directory
        calls.append(Path(cfg.data.prepared))
        calls[-1].mkdir(parents=True)
        (calls[-1] / "manifest.json").write_text("{}")

    monkeypatch.setattr(runner, "prepare", prepare)
    (tmp_path / "sharing.yaml").write_text(SPEC)
    spec = load_spec(str(tmp_path / "sharing.yaml"))
    text = io.StringIO()
    study = runner.Study(spec, tmp_path / "out", Console(file=text, width=200))
    where = study.prepare_data(check_configs(spec, study.shared_keys()))
    assert where["ffn"] == where["lora"]  # memory and training keys do not touch the prepared data
    assert len({where["ffn"], where["short"], where["shallow"]}) == 3 and sorted(calls) == sorted(set(where.values()))
    assert all(path.parent == tmp_path / "out" / "prepared" for path in calls)

    assert study.prepare_data(check_configs(spec, study.shared_keys())) == where  # a rerun prepares nothing
    assert len(calls) == 3 and text.getvalue().count("(reused)") == 3
