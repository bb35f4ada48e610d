"""The anchor transformer, open-weight Hugging Face anchors, its
memory-augmented FFN, the chunked LM loss, parameter accounting, and the
encoder-decoder memory models (`build_model` picks one by `model.family`)."""
from hmtrain.model.factory import FAMILIES, build_model, counted_targets
from hmtrain.model.hf_anchor import HFAnchor
from hmtrain.model.loss import lm_loss_sum
from hmtrain.model.memory_model import MemoryModel
from hmtrain.model.sizes import count_parameters, dense_config, run_model_config
from hmtrain.model.transformer import Transformer, lm_loss

__all__ = ["FAMILIES", "HFAnchor", "MemoryModel", "Transformer", "build_model", "count_parameters", "counted_targets",
           "dense_config", "lm_loss", "lm_loss_sum", "run_model_config"]
