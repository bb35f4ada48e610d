"""An open-weight anchor (model.family=hf, a tiny random Llama) under torchrun with gloo: FSDP2 shards its
decoder layers and DeepSpeed ZeRO-2 holds it, and 2 ranks train as 1 rank on the same global batch, in the
post-hoc recipe (anchor frozen) and co-trained (the anchor's gradients reduced over ranks)."""
import pytest

from tests.dist.conftest import torchrun
from tests.dist.test_train_distributed import assert_same_run, losses
from tests.e2e.conftest import run_cli
from tests.hf_models import save_tiny

pytestmark = pytest.mark.timeout(900)

SMALL = ["model.document_mask=false", "memory.units=[8,4]", "tree.branching=[2,3]", "data.seq_len=64",
         "data.embedder=hashing", "data.shard_samples=16", "data.heldout_fraction=0.1"]
# 8 sequences per step: 4 micro-batches of 2 on one rank, 2 on each of two
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.memory_steps=5", "train.checkpoint_every=5",
         "train.log_every=1", "train.progress=false", "logging.mlflow=false", "train.memory_optim.lr=3e-2",
         "train.anchor_optim.lr=3e-3", "train.clip_grad=1.0", "parallel.timeout_s=60"]
COTRAIN = ["train.anchor=cotrain"]  # the anchor at the memory phase's schedule (train.cotrain_optim unset)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hfdist")
    model_dir = save_tiny("llama", root / "llama")
    run_cli("data", "synth", "--out", str(root / "corpus"), "--people", "40", "--documents", "200", cwd=root)
    overrides = ["--config", "posthoc-tiny", f"model.hf_path={model_dir}", *SMALL]
    run_cli("data", "prepare", *overrides, f"data.documents={root / 'corpus' / 'documents.jsonl.gz'}",
            f"data.prepared={root / 'prepared'}", cwd=root)
    return {"root": root, "overrides": [*overrides, f"data.prepared={root / 'prepared'}", *TRAIN]}


def train(llama, name, nproc, *extra, env=None):
    run_dir = llama["root"] / name
    args = ["train", *llama["overrides"], f"train.run_dir={run_dir}", *extra]
    if nproc == 1:
        run_cli(*args, cwd=llama["root"])
        return run_dir, None
    return run_dir, torchrun(nproc, ["-m", "hmtrain.cli", *args], cwd=llama["root"], env=env)


def test_two_ranks_train_an_hf_anchor_as_one(llama):
    frozen, _ = train(llama, "frozen_one", 1)
    first = losses(frozen)
    assert first[5] < first[1], "the memory must learn"
    fsdp, proc = train(llama, "frozen_fsdp2", 2, env={"HMTRAIN_LOG_LEVEL": "INFO"})
    # every decoder layer is its own FSDP2 unit (parallelize finds them through _no_split_modules)
    assert proc.stderr.count("anchor sharded with FSDP2 over 2 ranks: 2 blocks (LlamaDecoderLayer)") == 2, \
        proc.stderr[-4000:]
    assert_same_run(frozen, fsdp, "frozen anchor, FSDP2")
    assert_same_run(frozen, train(llama, "frozen_zero2", 2, "parallel.engine=deepspeed")[0], "frozen anchor, ZeRO-2")

    cotrained, _ = train(llama, "cotrain_one", 1, *COTRAIN)
    assert_same_run(cotrained, train(llama, "cotrain_fsdp2", 2, *COTRAIN)[0], "co-trained anchor, FSDP2")
