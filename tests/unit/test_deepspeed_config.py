"""The config hmtrain hands DeepSpeed: under bf16, gradients accumulate over micro-batches in fp32."""
import pytest
import torch

from hmtrain.parallel.deepspeed_engine import deepspeed_config


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
