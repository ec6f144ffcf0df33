"""TensorFlow, imported where a ``tf.data`` pipeline is built.

``keras_lcmae.data`` is imported by every recipe and tool, also under the
JAX and PyTorch backends and by code that only reads Fashion-MNIST or lists
an image folder; importing TensorFlow costs seconds and memory, so the
pipeline builders call :func:`_tf` instead of importing it at module level.
"""


def _tf():
    import tensorflow as tf

    return tf
