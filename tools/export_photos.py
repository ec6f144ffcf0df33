#!/usr/bin/env python
"""Writes scikit-image's bundled colour photos into an image folder, so the
recipes and ``tools/analyze.py`` can use them offline (``--data=FOLDER``)::

    python tools/export_photos.py --output_dir=runs/photos --crops=20

One sub-folder per photo (``astronaut/``, ``coffee/``...), holding the photo
itself; ``--crops=K`` adds K random crops of each (at least half its side)
as more training images.
"""

import os
import sys

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # tools/cli.py, importable once tools/ is on the path

FLAGS = cli.new_flags()
flags.DEFINE_string("output_dir", None, "The folder to write (one sub-folder per photo).", flag_values=FLAGS)
flags.mark_flag_as_required("output_dir", flag_values=FLAGS)
flags.DEFINE_integer("crops", 0, "Random crops of each photo to add.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the crops.", flag_values=FLAGS)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def export(root, crops=0, seed=0):
    """Writes the photos (and ``crops`` random crops of each) under ``root``;
    returns the number of files written."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    count = 0
    for name in PHOTOS:
        photo = np.asarray(getattr(skdata, name)())[..., :3]
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(photo).save(os.path.join(folder, f"{name}.png"))
        count += 1
        h, w = photo.shape[:2]
        for i in range(crops):
            side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            Image.fromarray(photo[y : y + side, x : x + side]).save(os.path.join(folder, f"crop_{i:03d}.png"))
            count += 1
    return count


def main(argv=None):
    """Writes the folder; returns the number of images."""
    cli.parse(FLAGS, argv, __doc__)
    n = export(FLAGS.output_dir, FLAGS.crops, FLAGS.seed)
    print(f"{n} images in {FLAGS.output_dir}", flush=True)
    return n


if __name__ == "__main__":
    main()
