"""Data sources and ``tf.data`` pipelines.

Every name is importable from ``keras_lcmae.data``; the modules hold them by
concern:

* :mod:`~keras_lcmae.data.fashion_mnist`: Fashion-MNIST read offline
  (Debian's ``dataset-fashion-mnist`` package or the Keras cache);
* :mod:`~keras_lcmae.data.folders`: image folders (PIL decoding, the
  fail-fast check, the ``tf.data`` source);
* :mod:`~keras_lcmae.data.tfrecords`: TFRecord files of ``tf.train.Example``
  (the schema check, record counts, the source);
* :mod:`~keras_lcmae.data.sources`: TFDS datasets on disk and numpy arrays;
* :mod:`~keras_lcmae.data.skipped`: :class:`SkipCounter`, the unreadable
  files or records a source skipped;
* :mod:`~keras_lcmae.data.augment`: RandomResizedCrop, flips, resize and
  centre crop, normalisation, Mixup / CutMix;
* :mod:`~keras_lcmae.data.pipelines`: the batched pipelines of the recipes.

TensorFlow is imported only when a pipeline is built, so reading
Fashion-MNIST or listing a folder does not load it.
"""

from keras_lcmae.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    mixup_cutmix,
    normalize,
    pretrain_transform,
    random_resized_crop,
)
from keras_lcmae.data.fashion_mnist import (
    FASHION_MNIST_DIRS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_for_vit,
    find_fashion_mnist,
    load_fashion_mnist,
)
from keras_lcmae.data.folders import (
    IMAGE_EXTENSIONS,
    check_image_folder,
    image_folder_dataset,
    list_image_folder,
    read_image,
)
from keras_lcmae.data.pipelines import batched_pretrain_dataset, labelled_dataset
from keras_lcmae.data.skipped import SkipCounter
from keras_lcmae.data.sources import array_dataset, tfds_dataset
from keras_lcmae.data.tfrecords import (
    TFRECORD_FEATURES,
    check_tfrecords,
    count_tfrecords,
    tfrecord_dataset,
    tfrecord_files,
)

__all__ = [
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "TFRECORD_FEATURES",
    "SkipCounter",
    "array_dataset",
    "batched_pretrain_dataset",
    "check_image_folder",
    "check_tfrecords",
    "count_tfrecords",
    "eval_transform",
    "fashion_mnist_for_vit",
    "find_fashion_mnist",
    "image_folder_dataset",
    "labelled_dataset",
    "list_image_folder",
    "load_fashion_mnist",
    "mixup_cutmix",
    "normalize",
    "pretrain_transform",
    "random_resized_crop",
    "read_image",
    "tfds_dataset",
    "tfrecord_dataset",
    "tfrecord_files",
]
