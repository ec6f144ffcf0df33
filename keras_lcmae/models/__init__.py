"""MAE and its variants as self-training Keras models.

* :class:`MAE` (``models/mae.py``): official MAE, with a masking strategy
  (random or self-guided);
* :class:`LCMAE` (``models/lcmae.py``): two views, a projector and the local
  contrastive losses; :data:`SETTINGS` holds the paper's ablation rows;
* :class:`AutoEncoder` (``models/autoencoder.py``): AE(k), no masking;
* ``models/base.py``: what the three share.
"""

from keras_lcmae.models.autoencoder import AutoEncoder, block_indices
from keras_lcmae.models.base import ReconstructionModel, unpack_inputs
from keras_lcmae.models.lcmae import LCMAE, SETTINGS, resolve_loss_weights
from keras_lcmae.models.mae import MAE

__all__ = [
    "MAE",
    "LCMAE",
    "AutoEncoder",
    "ReconstructionModel",
    "SETTINGS",
    "block_indices",
    "resolve_loss_weights",
    "unpack_inputs",
]
