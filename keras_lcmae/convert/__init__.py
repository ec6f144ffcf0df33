"""Weights in and out of keras_lcmae.

* :mod:`keras_lcmae.convert.official`: the official MAE key layout (also
  timm's) <-> our variables, state dicts in memory;
* :mod:`keras_lcmae.convert.files`: checkpoint files (``.safetensors``,
  ``.pth``, ``.npz``, ``.keras``): :func:`load_pretrained`, :func:`export`,
  :func:`read_state_dict`;
* :mod:`keras_lcmae.convert.hf`: Hugging Face ViT / ViTMAE folders;
* :mod:`keras_lcmae.convert.hub`: keras-hub's ``ViTBackbone`` both ways
  (:func:`to_keras_hub`, :func:`from_keras_hub`).
"""

from keras_lcmae.convert.files import STANDARD_HEADS, export, load_pretrained, read_state_dict
from keras_lcmae.convert.hf import hf_to_official, load_hf_folder, read_hf_folder
from keras_lcmae.convert.hub import from_keras_hub, to_keras_hub
from keras_lcmae.convert.official import (
    encoder_from_official_state_dict,
    encoder_kwargs_from_state_dict,
    export_official_state_dict,
    load_official_state_dict,
    mae_from_official_state_dict,
    official_entries,
)

__all__ = [
    "STANDARD_HEADS",
    "encoder_from_official_state_dict",
    "encoder_kwargs_from_state_dict",
    "export",
    "export_official_state_dict",
    "from_keras_hub",
    "hf_to_official",
    "load_hf_folder",
    "load_official_state_dict",
    "load_pretrained",
    "mae_from_official_state_dict",
    "official_entries",
    "read_hf_folder",
    "read_state_dict",
    "to_keras_hub",
]
