"""torchrun worker: `lm_loss_sum` on a head split by rows over the ranks (the vocabulary-parallel loss) equals the
whole head's, loss, token count and both gradients, for chunks that do not divide the tokens, ignored labels,
targets on every rank's rows, and under bf16 autocast; no gradient without grad mode. Writes OUT/rank<r>.json."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from hmtrain.model.loss import lm_loss_sum


def compare(mesh, chunk_tokens: int, autocast: bool) -> dict:
    torch.manual_seed(chunk_tokens)  # the same on every rank
    hidden = torch.randn(3, 7, 16)
    weight = torch.randn(24, 16)
    labels = torch.randint(0, 24, (3, 7))
    labels[0, :3] = -100
    labels[2, 6] = 23  # the last rank's last row
    runs = []
    for split in (False, True):
        h = hidden.clone().requires_grad_()
        w = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]) if split else weight.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, count = lm_loss_sum(h, w, labels, chunk_tokens=chunk_tokens)
        (loss * 0.5).backward()
        grad_w = w.grad.full_tensor() if split else w.grad
        runs.append((loss.detach(), count, h.grad, grad_w))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*runs):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    with torch.no_grad():
        loss, _ = lm_loss_sum(hidden, distribute_tensor(weight, mesh, [Shard(0)]), labels, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(loss, runs[0][0].float(), **tol)
    return {"chunk_tokens": chunk_tokens, "autocast": autocast, "loss": runs[1][0].item()}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = [compare(mesh, chunk, autocast) for chunk in (4, 21, 4096) for autocast in (False, True)]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
