"""Writes the .keras files and outputs that tests/test_saved_models.py loads.

Run once with the library of commit 4e3901b on TensorFlow:
    python tests/scripts/make_saved_models.py tests/data/saved_2026-12-03
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras
import numpy as np

from keras_lcmae import ViTEncoder
from keras_lcmae.classifier import ViTClassifier
from keras_lcmae.decoders import ConvDecoder, GaussianAverageDecoder, TransformerDecoder
from keras_lcmae.models import LCMAE, MAE, AutoEncoder

out = sys.argv[1]
keras.utils.set_random_seed(0)


def enc():
    return ViTEncoder.from_preset("vit_test")


def dec():
    return TransformerDecoder(hidden_dim=32, depth=1, num_heads=2)


models = {
    "mae": MAE(enc(), dec(), seed=1),
    "mae_self_guided": MAE(
        enc(), dec(), masking="self_guided", informed_start_epoch=2, hint_ratio=0.1, guide_layer=0, seed=2
    ),
    "lcmae": LCMAE(
        enc(), dec(), projector_dim=48, loss_weights="e", projector_input="hidden", in_view_target="norm_pixels", seed=3
    ),
    "autoencoder": AutoEncoder(enc(), GaussianAverageDecoder(hidden_dim=32, window=3), block_size=16),
    "autoencoder_conv": AutoEncoder(enc(), ConvDecoder(hidden_dim=32, kernel_size=3)),
    "classifier": ViTClassifier(enc(), num_classes=5, pool="avg"),
    "probe": ViTClassifier(enc(), num_classes=5, linear_probe=True),
}
rng = np.random.default_rng(0)
images = rng.random((2, 32, 32, 3)).astype("float32")
noise = rng.random((2, 16)).astype("float32")
arrays = {"images": images, "noise": noise}
for name, m in models.items():
    if isinstance(m, ViTClassifier):
        m.compile()
        y = m(images, training=False)
        arrays[name + "/logits"] = keras.ops.convert_to_numpy(y)
    else:
        m.compile()
        n = (noise, noise) if isinstance(m, LCMAE) else noise
        o = m(images, noise=n, training=False)
        arrays[name + "/pred"] = keras.ops.convert_to_numpy(o["pred"])
        arrays[name + "/mask"] = keras.ops.convert_to_numpy(o["mask"])
    m.save(os.path.join(out, name + ".keras"))
np.savez(os.path.join(out, "outputs.npz"), **arrays)
print({k: v.shape for k, v in arrays.items()})
