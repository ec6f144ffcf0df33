"""keras_lcmae: Masked Autoencoders and LC-MAE in Keras 3 (TensorFlow, JAX, PyTorch)."""

from keras_lcmae import losses, ops
from keras_lcmae.decoders import TransformerDecoder
from keras_lcmae.encoder import PRESETS, ViTEncoder
from keras_lcmae.masking import random_masking
from keras_lcmae.models import LCMAE, MAE, SETTINGS

__version__ = "0.1.0"

__all__ = ["LCMAE", "MAE", "SETTINGS", "PRESETS", "TransformerDecoder", "ViTEncoder", "losses", "ops", "random_masking"]
