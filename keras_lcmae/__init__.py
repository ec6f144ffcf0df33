"""keras_lcmae: Masked Autoencoders and LC-MAE in Keras 3 (TensorFlow, JAX, PyTorch)."""

from keras_lcmae import losses, ops
from keras_lcmae.decoders import ConvDecoder, GaussianAverageDecoder, TransformerDecoder, build_decoder
from keras_lcmae.encoder import PRESETS, ViTEncoder
from keras_lcmae.masking import RandomMasking, SelfGuidedMasking, random_masking
from keras_lcmae.models import LCMAE, MAE, SETTINGS, AutoEncoder

__version__ = "0.1.0"

__all__ = [
    "AutoEncoder",
    "ConvDecoder",
    "GaussianAverageDecoder",
    "LCMAE",
    "MAE",
    "SETTINGS",
    "PRESETS",
    "RandomMasking",
    "SelfGuidedMasking",
    "TransformerDecoder",
    "build_decoder",
    "ViTEncoder",
    "losses",
    "ops",
    "random_masking",
]

from keras_lcmae.classifier import ViTClassifier, load_encoder, rebuild_encoder
from keras_lcmae.evaluation import extract_features, knn_accuracy, knn_classify
from keras_lcmae.optim import LARS, LayerDecayAdamW, finetune_adamw, layer_decay_multipliers

__all__ += [
    "LARS",
    "LayerDecayAdamW",
    "ViTClassifier",
    "extract_features",
    "finetune_adamw",
    "knn_accuracy",
    "knn_classify",
    "layer_decay_multipliers",
    "load_encoder",
    "rebuild_encoder",
]
