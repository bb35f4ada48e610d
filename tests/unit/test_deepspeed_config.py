"""The config hmtrain hands DeepSpeed: under bf16, gradients accumulate over micro-batches in fp32. Its
client optimizer groups ZeRO-3 partitioned parameters by their own shapes."""
import pytest
import torch

from hmtrain.parallel.deepspeed_engine import deepspeed_config
from hmtrain.parallel.torch_engine import build_adamw


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_bf16_accumulates_gradients_in_fp32(zero_stage):
    from deepspeed.runtime.config import DeepSpeedConfig, DtypeEnum

    built = deepspeed_config(zero_stage=zero_stage, micro_batch=2, accumulation=16, bf16=True)
    parsed = DeepSpeedConfig(built)  # DeepSpeed's own reading of it: a misspelt key would be ignored
    assert parsed.bfloat16_config.enabled
    assert parsed.grad_accum_dtype == "fp32", f"DeepSpeed would accumulate in {parsed.grad_accum_dtype or 'bf16'}"
    assert DtypeEnum(parsed.grad_accum_dtype).value == torch.float32  # as the engine reads it


def test_fp32_leaves_accumulation_to_the_model_dtype():
    from deepspeed.runtime.config import DeepSpeedConfig

    built = deepspeed_config(zero_stage=2, micro_batch=2, accumulation=16, bf16=False)
    assert DeepSpeedConfig(built).grad_accum_dtype is None  # fp32 params: fp32 gradients already


def test_partitioned_parameters_keep_their_weight_decay():
    """A DeepSpeed engine rebuilt over a ZeRO-3 module (a new phase, a resume) sees each parameter as an empty
    tensor with its shape in `ds_shape`: matrices stay decayed, and the optimizer keeps the saved one's groups
    (else DeepSpeed's resume fails on "a different number of parameter groups")."""
    from hmtrain.config import OptimConfig

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optim = OptimConfig(lr=0.1, weight_decay=0.1)
    whole = [[tuple(p.shape) for p in g["params"]] for g in build_adamw(model, optim, torch.device("cpu")).param_groups]
    for p in model.parameters():  # what deepspeed.zero partitioning leaves on the module
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    partitioned = build_adamw(model, optim, torch.device("cpu")).param_groups
    assert [[tuple(p.ds_shape) for p in g["params"]] for g in partitioned] == whole == [[(3, 4)], [(3,), (3,), (3,)]]
    assert [g["weight_decay"] for g in partitioned] == [0.1, 0.0]
