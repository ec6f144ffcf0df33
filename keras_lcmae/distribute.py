"""Distribution helpers (the one library module besides ``data.py`` that may
touch TensorFlow directly)."""

import keras


def num_replicas():
    """Replicas of the current ``tf.distribute`` strategy (1 elsewhere)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf  # noqa: PLC0415

    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_loss_for_replicas(loss):
    """Divides a per-replica loss by the replica count under ``tf.distribute``,
    as Keras' own ``compute_loss`` does: the TensorFlow trainer sums replica
    gradients and un-scales the reported loss. A no-op elsewhere (JAX and
    PyTorch distribution average by themselves)."""
    n = num_replicas()
    if n == 1:
        return loss
    return loss * (1.0 / n)
