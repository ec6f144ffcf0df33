#!/usr/bin/env python
"""The paper's collapse finding at tiny scale (LC-MAE Table 1, setting c).

Trains a tiny LC-MAE on real Fashion-MNIST under several loss settings with
the same seed, data and schedule, and prints the collapse indicator ``v_std``
(std of the l2-normalised projector outputs across tokens, ~1/sqrt(d) healthy,
0 collapsed) at the start and at the end of training, one JSON line per
setting. Cross-view loss alone (c) should collapse; (a), (b), (e) should not.

    KERAS_BACKEND=torch python tools/collapse_study.py --settings a,b,c,e --steps 300
"""

import json
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # tools/cli.py, importable once tools/ is on the path

SETTINGS = tuple("abcdefg")  # the keys of keras_lcmae.models.SETTINGS (parsing the flags imports no Keras)
FLAGS = cli.new_flags()
flags.DEFINE_string(
    "settings",
    "a,b,c,e",
    "Comma list of the LC-MAE loss settings (a-g of the paper's Table 1) to train, one after the other.",
    flag_values=FLAGS,
)
flags.register_validator(
    "settings",
    lambda v: all(s.strip().strip("()").lower() in SETTINGS for s in v.split(",")),
    "must be a comma list of LC-MAE settings a-g",
    flag_values=FLAGS,
)
flags.DEFINE_integer("steps", 300, "Training steps per setting.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Images per step.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("lr", 1e-3, "AdamW learning rate.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer(
    "seed", 0, "Seed of the model, data order and masks (the same for every setting).", flag_values=FLAGS
)
flags.DEFINE_integer("images", 2000, "Fashion-MNIST training images used.", lower_bound=1, flag_values=FLAGS)


def run_setting(setting, images, steps, batch_size, lr, seed, projector_dim=64):
    import keras
    import numpy as np

    from keras_lcmae import LCMAE, TransformerDecoder, ViTEncoder
    from keras_lcmae.losses import collapse_std

    keras.utils.set_random_seed(seed)
    encoder = ViTEncoder(image_size=32, patch_size=4, num_channels=1, hidden_dim=64, depth=2, num_heads=4)
    model = LCMAE(
        encoder,
        TransformerDecoder(hidden_dim=64, depth=2, num_heads=4),
        projector_dim=projector_dim,
        loss_weights=setting,
        seed=seed,
    )
    probe = images[:64]
    noise = np.random.default_rng(seed).random((128, encoder.num_patches)).astype("float32")

    def indicator():
        out = model(probe, noise=noise, training=False)
        return float(keras.ops.convert_to_numpy(collapse_std(model.project(out["features"]))))

    start = indicator()
    model.compile(optimizer=keras.optimizers.AdamW(lr, beta_1=0.9, beta_2=0.95, weight_decay=0.05))
    n = (steps * batch_size) // len(images) + 1
    data = np.concatenate([images] * n)[: steps * batch_size]
    t = time.time()
    history = model.fit(data, batch_size=batch_size, epochs=1, verbose=0, shuffle=True)
    end = indicator()
    h = {k: float(v[-1]) for k, v in history.history.items()}
    return {
        "setting": setting,
        "weights": model.loss_weights,
        "v_std_start": round(start, 4),
        "v_std_end": round(end, 4),
        "healthy_reference": round(1 / projector_dim**0.5, 4),
        "last_epoch": {k: round(v, 4) for k, v in h.items()},
        "steps": steps,
        "seconds": round(time.time() - t, 1),
    }


def main(argv=None):
    cli.parse(FLAGS, argv, __doc__)
    from keras_lcmae.data import fashion_mnist_for_vit

    images, _ = fashion_mnist_for_vit("train", image_size=32, channels=1, limit=FLAGS.images)
    images = (images - 0.286) / 0.353  # Fashion-MNIST mean/std
    for setting in FLAGS.settings.split(","):
        print(
            json.dumps(run_setting(setting.strip(), images, FLAGS.steps, FLAGS.batch_size, FLAGS.lr, FLAGS.seed)),
            flush=True,
        )


if __name__ == "__main__":
    main()
