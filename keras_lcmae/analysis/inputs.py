"""Images and checkpoints for the analysis tools (numpy + PIL, no TensorFlow).

Images are normalised exactly as ``recipes/pretrain.py`` feeds them:
``(x / 255 - mean) / std`` with the Fashion-MNIST statistics for
``fashion_mnist``, ImageNet's for 3-channel image folders and 0.5 / 0.5
otherwise. Resizing is deterministic (no augmentation): the shorter side is
resized (bicubic) to the model's size and the centre is cropped.
"""

import os

import keras
import numpy as np

from keras_lcmae import data
from keras_lcmae.encoder import ViTEncoder
from keras_lcmae.errors import ArgumentError
from keras_lcmae.ops import to_2tuple


def normalization_stats(source, channels):
    """``(mean, std)`` tuples the pretraining recipe uses for ``source``."""
    if source == "fashion_mnist":
        return data.FASHION_MNIST_MEAN * channels, data.FASHION_MNIST_STD * channels
    if channels == 3:
        return data.IMAGENET_MEAN, data.IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def _resize_center_crop(image, size):
    from PIL import Image  # an optional dependency, needed only to resize images

    h, w = size
    arr = image[..., 0] if image.shape[-1] == 1 else image
    img = Image.fromarray(arr)
    scale = max(h / img.height, w / img.width)
    new = (max(w, int(round(img.width * scale))), max(h, int(round(img.height * scale))))
    img = img.resize(new, Image.BICUBIC)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    out = np.asarray(img.crop((left, top, left + w, top + h)), np.uint8)
    return out[..., None] if out.ndim == 2 else out


def load_images(source, image_size, channels, num_images, seed=0, resize=True):
    """``(images, mean, std)``: ``num_images`` float32 NHWC images normalised
    for the model, and the statistics used (to turn them back into pixels).

    Args:
        source: ``"fashion_mnist"`` (the test split, offline) or a folder of
            images (flat, or one sub-folder per class).
        image_size: the model's ``(height, width)`` (or int).
        channels: the model's input channels (1 or 3).
        num_images: how many images; a seeded random choice among all.
        seed: seed of that choice.
        resize: resize + centre-crop to ``image_size``; with ``False`` every
            image must already have that size (else ``ValueError``).
    """
    h, w = to_2tuple(image_size, "image_size")
    if int(num_images) < 1:
        raise ArgumentError("num_images", f"must be at least 1, got {num_images}.")
    rng = np.random.default_rng(seed)
    if source == "fashion_mnist":
        raw, _ = data.load_fashion_mnist("test")
        pick = np.sort(rng.choice(len(raw), size=min(int(num_images), len(raw)), replace=False))
        raw = [np.repeat(raw[i][..., None], channels, axis=-1) for i in pick]
    elif os.path.isdir(source):
        paths, _, _ = data.list_image_folder(source)
        pick = np.sort(rng.choice(len(paths), size=min(int(num_images), len(paths)), replace=False))
        raw = []
        for i in pick:
            arr = data.read_image(paths[i], channels)
            if arr is None:
                raise ArgumentError("source", f"cannot read image file {paths[i]!r}.")
            raw.append(arr)
    else:
        raise ArgumentError("source", f"must be 'fashion_mnist' or an existing image folder, got {source!r}.")
    out = []
    for arr in raw:
        if arr.shape[:2] != (h, w):
            if not resize:
                raise ArgumentError(
                    "resize",
                    f"image of size {arr.shape[0]}x{arr.shape[1]} but the model takes {h}x{w}; pass "
                    "resize=True to resize and centre-crop, or use images of the model's size.",
                )
            arr = _resize_center_crop(arr, (h, w))
        out.append(arr)
    mean, std = normalization_stats(source, channels)
    images = (np.stack(out).astype("float32") / 255.0 - np.asarray(mean, "float32")) / np.asarray(std, "float32")
    return images, mean, std


def to_pixels(images, mean, std):
    """Normalised images back to ``[0, 1]`` pixels."""
    x = np.asarray(images, "float32") * np.asarray(std, "float32") + np.asarray(mean, "float32")
    return np.clip(x, 0.0, 1.0)


def load_checkpoint(path):
    """Loads a ``.keras`` file of this package and says what it is.

    Returns ``(model, kind)`` with ``kind`` ``"mae"`` (an MAE / LC-MAE model:
    encoder and decoder analyses) or ``"encoder"`` (a :class:`ViTEncoder`:
    encoder analyses only). Raises ``FileNotFoundError`` for a missing file
    and ``ValueError`` for anything else.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no file at {path!r}.")
    if not str(path).endswith(".keras"):
        raise ArgumentError("path", f"must be a .keras file (model.save / encoder.keras), got {path!r}.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # keras raises many kinds for foreign files
        raise ArgumentError("path", f"cannot load {path!r} as a Keras model: {e}") from e
    if isinstance(model, ViTEncoder):
        return model, "encoder"
    if isinstance(getattr(model, "encoder", None), ViTEncoder) and hasattr(model, "forward_encoder"):
        return model, "mae"
    raise ArgumentError(
        "path",
        f"{path!r} holds a {type(model).__name__}; expected an MAE/LC-MAE model "
        "(checkpoints/epoch_NNN.keras of recipes/pretrain.py) or a ViTEncoder (encoder.keras).",
    )
