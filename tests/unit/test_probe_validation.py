"""Probes in validation during training (hmtrain/train/probe_validation.py) against `hmtrain eval`'s
probe_accuracy: the same hits per bucket from the training-shaped path (batches padded to one shape, extra
padding-only rounds, the bank's planned lookups), and each rank's share as held-out sequences are split."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hmtrain.config import ConfigError, ModelConfig, load_config
from hmtrain.data.corpus.probes import bucket_counts
from hmtrain.data.routing.questions import ProbeSet
from hmtrain.data.tokenizer import Tokenizer
from hmtrain.eval.probes import probe_accuracy
from hmtrain.memory import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.model import Transformer
from hmtrain.parallel.device import Precision
from hmtrain.train.probe_validation import probe_hits_per_bucket, probe_work, validation_probes
from hmtrain.train.validation import probe_ids_per_rank

CPU = torch.device("cpu")
WORDS = ["red", "tea", "Oslo", "Lima", "x", "y", "z", "w"]  # short: the memory, not the length, decides


def probe_set(n: int = 9) -> ProbeSet:
    rng = np.random.default_rng(0)
    probes = []
    for i in range(n):
        choices = [str(c) for c in rng.choice(WORDS, size=2 + i % 3, replace=False)]
        probes.append({"question": f"q{i}", "prompt": f"Person {i} likes", "choices": choices,
                       "answer": choices[i % len(choices)], "bucket": ["1", "2-3", "4+"][i % 3]})
    paths = torch.tensor([[i % 2, 2 * (i % 2) + (i // 2) % 2] for i in range(n)])  # level-2 ids are global
    return ProbeSet(probes=probes, paths=paths)


def live_run(micro: int) -> SimpleNamespace:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=260, d_model=16, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=24),
                        max_seq_len=64).eval()
    bank = MemoryBank(n_layers=2, kind=SwiGLUUnits(d_model=16), branching=(2, 2), units=(3, 2), seed=1)
    gen = torch.Generator().manual_seed(2)
    for table in bank.tables.values():  # large trained-looking rows, so memory changes the picks
        table.copy_(2 * torch.randn(table.shape, generator=gen))
    return SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(micro_batch_size=micro)),
                           info=SimpleNamespace(device=CPU), bank=bank, precision=Precision(CPU, None),
                           engine=SimpleNamespace(model=model), data=SimpleNamespace(tokenizer=Tokenizer("byte")))


def test_training_path_hits_equal_eval_probe_accuracy():
    run, probes = live_run(micro=4), probe_set()
    work = probe_work(probes, run.data.tokenizer, [np.arange(9)], rank=0, micro=4)
    assert work.rounds == -(-len(work.prompts) // 4)
    work = dataclasses.replace(work, rounds=work.rounds + 2)  # as a less busy rank: padding-only batches
    counts = bucket_counts(probes.probes)
    hits = {}
    for variant in ("fetched", "generic", "none"):
        hits[variant] = probe_hits_per_bucket(run, work, variant, bar=None)
        want = probe_accuracy(run.engine.model, run.bank, variant, probes, run.data, CPU, batch_size=5)
        assert [h / counts[b] for h, b in zip(hits[variant], work.buckets)] == [want[b] for b in work.buckets]
    assert hits["fetched"] != hits["none"]  # the memory really takes part in the picks


def test_probes_are_split_over_ranks_as_heldout_sequences():
    probes = probe_set(9)
    for owner, group_size in ((None, 1), (np.array([1, 0]), 1), (np.array([0, 0]), 2)):
        run = SimpleNamespace(info=SimpleNamespace(world_size=2, dp_size=2), cfg=SimpleNamespace(train=SimpleNamespace(
            micro_batch_size=2)), owner_of_subtree=owner, group_size=group_size)
        shares = probe_ids_per_rank(run, probes)
        assert sorted(np.concatenate(shares).tolist()) == list(range(9)), owner
        if owner is not None and group_size == 1:  # each probe on the rank owning its question's subtree
            for rank, ids in enumerate(shares):
                assert all(owner[probes.paths[i, 0]] == rank for i in ids), rank


def test_a_missing_probe_file_names_the_key(tmp_path):
    cfg = load_config("tiny", ["train.eval_every=2", "train.eval_probes=4", f"data.probes={tmp_path / 'no.jsonl'}"])
    with pytest.raises(ConfigError, match="data.probes.*train.eval_probes.*not found"):
        validation_probes(cfg, data=None, device=CPU)  # before the data is read
    cfg.train.eval_every = 0  # no validation: no probes, whatever the file
    assert validation_probes(cfg, data=None, device=CPU) is None
