"""The anchor transformer, its memory-augmented FFN, and parameter accounting."""
from hmtrain.model.sizes import count_parameters, dense_config, run_model_config
from hmtrain.model.transformer import Transformer, lm_loss

__all__ = ["Transformer", "count_parameters", "dense_config", "lm_loss", "run_model_config"]
