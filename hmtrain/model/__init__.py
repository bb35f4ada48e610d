"""The anchor transformer, its memory-augmented FFN, the chunked LM loss, and parameter accounting."""
from hmtrain.model.loss import lm_loss_sum
from hmtrain.model.sizes import count_parameters, dense_config, run_model_config
from hmtrain.model.transformer import Transformer, lm_loss

__all__ = ["Transformer", "count_parameters", "dense_config", "lm_loss", "lm_loss_sum", "run_model_config"]
