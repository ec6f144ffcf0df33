"""Analysis tools of the LC-MAE paper (Sec. 4) and Self-guided MAE.

* :mod:`~keras_lcmae.analysis.metrics` -- attention distance, attention
  similarity (Eq. 7), semantic similarity (Eq. 8), clustering statistics;
  pure numpy functions with their formulas in the docstrings.
* :mod:`~keras_lcmae.analysis.extract` -- per-layer attention and features of
  an encoder, or of an MAE / LC-MAE decoder under a given mask.
* :mod:`~keras_lcmae.analysis.inputs` -- analysis images and checkpoints.
* :mod:`~keras_lcmae.analysis.plots` -- the paper-style figures (matplotlib).

``tools/analyze.py`` runs them from the command line.

Example:
>>> import numpy as np
>>> from keras_lcmae import ViTEncoder
>>> from keras_lcmae.analysis import encoder_layers, attention_distance
>>> enc = ViTEncoder.from_preset("vit_test")
>>> out = encoder_layers(enc, np.zeros((2, 32, 32, 3), "float32"))
>>> attention_distance(out["attention"][0], enc.grid_size, enc.patch_size).shape
(2,)
"""

from keras_lcmae.analysis.extract import decoder_layers, encoder_layers, reference_features, shared_noise
from keras_lcmae.analysis.metrics import (
    attention_distance,
    attention_nmi,
    attention_similarity,
    clustering_metrics,
    exploitation_rates,
    mean_pairwise_distance,
    pairwise_patch_distances,
    patch_attention,
    patch_centers,
    resize_token_grid,
    semantic_similarity,
    similarity_weights,
    token_relation_kl,
)

__all__ = [
    "attention_distance",
    "attention_nmi",
    "exploitation_rates",
    "token_relation_kl",
    "attention_similarity",
    "clustering_metrics",
    "decoder_layers",
    "encoder_layers",
    "mean_pairwise_distance",
    "pairwise_patch_distances",
    "patch_attention",
    "patch_centers",
    "reference_features",
    "resize_token_grid",
    "semantic_similarity",
    "shared_noise",
    "similarity_weights",
]
