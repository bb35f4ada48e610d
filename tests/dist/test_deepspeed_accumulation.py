"""DeepSpeed on 2 ranks steps once per optimizer step, after that step's last micro-batch, however many
micro-batches the step holds (owner placement: as many as its busiest rank needs)."""
import pytest
import torch

from tests.dist import deepspeed_worker as worker
from tests.dist.conftest import torchrun

pytestmark = pytest.mark.timeout(300)


def test_deepspeed_steps_at_the_trainers_last_micro_batch(tmp_path):
    torchrun(2, [worker.__file__, str(tmp_path / "out")], cwd=tmp_path, timeout=240)
    for rank in range(2):
        weights = torch.load(tmp_path / "out" / f"rank{rank}.pt")
        torch.testing.assert_close(weights["deepspeed"], weights["reference"], msg=lambda m: f"rank {rank}: {m}")
