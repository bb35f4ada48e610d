"""torchrun worker: DeepSpeedEngine over steps holding more, and fewer, micro-batches than its
gradient_accumulation_steps, as owner placement gives them; the anchor must end where plain AdamW over
the summed gradients of every step ends.

Usage: deepspeed_worker.py OUT   (writes OUT/rank<r>.pt: {"deepspeed": weights, "reference": weights})
Micro-batch k of a step has loss c_k * sum(w x): the third micro-batch of step 0 outweighs the first two
with the opposite sign, so an update taken at DeepSpeed's own boundary (after two) moves the other way.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

from hmtrain.config import OptimConfig
from hmtrain.parallel.deepspeed_engine import DeepSpeedEngine
from hmtrain.parallel.torch_engine import build_adamw

TIMEOUT = datetime.timedelta(seconds=60)  # a hung collective fails the worker, not the suite
COEFFICIENTS = [[1.0, 1.0, -5.0], [2.0, -1.0], [1.0, 3.0, -2.0, 1.0]]  # per step, per micro-batch
OPTIM = OptimConfig(lr=0.1, min_lr=0.1, weight_decay=0.0, warmup_steps=0, schedule="constant")


def inputs(step: int, rank: int, k: int) -> torch.Tensor:
    return torch.randn(1, 4, generator=torch.Generator().manual_seed(100 * step + 10 * rank + k)).abs() + 0.5


def loss(model: torch.nn.Module, step: int, rank: int, k: int) -> torch.Tensor:
    return COEFFICIENTS[step][k] * model(inputs(step, rank, k)).sum()


def main() -> int:
    out = sys.argv[1]
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False)
    reference = torch.nn.Linear(4, 3, bias=False)
    reference.load_state_dict(model.state_dict())
    engine = DeepSpeedEngine(model, OPTIM, torch.device("cpu"), zero_stage=2, micro_batch=1, accumulation=2,
                             world_size=world, bf16=False)
    adamw = build_adamw(reference, OPTIM, torch.device("cpu"))
    for step, coefficients in enumerate(COEFFICIENTS):
        for k in range(len(coefficients)):
            engine.backward(loss(engine.model, step, rank, k) * engine.loss_multiplier, last=k == len(coefficients) - 1)
            for r in range(world):  # the reference sees every rank's micro-batches
                loss(reference, step, r, k).backward()
        engine.step(OPTIM.lr, torch.ones(()), max_norm=0.0)
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    os.makedirs(out, exist_ok=True)
    torch.save({"deepspeed": model.weight.detach().clone(), "reference": reference.weight.detach().clone()},
               os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
