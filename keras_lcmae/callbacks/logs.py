"""What a run writes for a person to watch: ``lr`` and throughput in the
epoch logs, step-level TensorBoard scalars, reconstruction pictures, the
skipped-files warning.

TensorFlow (``tf.summary``) is imported by the callbacks that write
TensorBoard events, when they first write, so that the others work without
it under JAX and PyTorch.
"""

import os
import time

import keras
import numpy as np

from keras_lcmae.callbacks._values import _as_float, _iterations


class TrainingStats(keras.callbacks.Callback):
    """Adds ``lr`` and ``images_per_s`` to each epoch's logs (place it before
    the TensorBoard callback so they are written too)."""

    def __init__(self, schedule, batch_size):
        super().__init__()
        self.schedule = schedule
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        seconds = max(time.perf_counter() - self._start, 1e-9)
        logs["images_per_s"] = self._steps * self.batch_size / seconds
        iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        logs["lr"] = float(keras.ops.convert_to_numpy(self.schedule(iterations)))


class SkippedFilesWarning(keras.callbacks.Callback):
    """One warning giving the count when the pipeline skipped unreadable files."""

    def __init__(self, skipped):
        super().__init__()
        self.skipped = skipped

    def on_epoch_end(self, epoch, logs=None):
        n = self.skipped.warn_if_new()
        if logs is not None:
            logs["skipped_files"] = float(n)


class StepLogger(keras.callbacks.Callback):
    """Step-level TensorBoard scalars: every ``every`` optimizer updates, each
    numeric entry of the batch logs goes under ``step/<name>`` (``step/loss``,
    ``step/loss_mae``, ...) and, with a ``schedule``, ``step/lr`` =
    ``schedule(iterations)`` (the lr of the next update, as
    :class:`TrainingStats` reports it); the TensorBoard step is the
    optimizer's update count ``iterations``, so a resumed run continues the
    same curve. Events go to a file writer in ``log_dir`` (a folder of its
    own, e.g. ``tensorboard/steps``, shows as its own run).

    What is written is what Keras puts in the batch logs: the running mean of
    each metric since the epoch began (Keras 3 resets the metrics at each
    epoch), not the value of that one batch; the curve is therefore smooth
    within an epoch and restarts at each epoch boundary. A non-finite loss is
    written as is. With ``steps_per_execution > 1`` the batch callbacks see
    only every k-th update; a row is written whenever a multiple of ``every``
    was passed since the last one.

    Example:
    >>> import tempfile
    >>> from keras_lcmae.optim import WarmupCosine
    >>> log_dir = tempfile.TemporaryDirectory()           # e.g. "runs/mae/tensorboard/steps"
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> logger = StepLogger(log_dir.name, every=2, schedule=WarmupCosine(0.1, warmup_steps=2, total_steps=8))
    >>> _ = model.fit(np.ones((8, 2)), np.zeros(8), batch_size=2, epochs=2, verbose=0, callbacks=[logger])
    >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    >>> events = EventAccumulator(log_dir.name).Reload()
    >>> sorted(events.Tags()["tensors"]), [e.step for e in events.Tensors("step/loss")]
    (['step/loss', 'step/lr'], [2, 4, 6, 8])
    """

    def __init__(self, log_dir, every, schedule=None, prefix="step/"):
        super().__init__()
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise ValueError(f"every must be an integer >= 1 (optimizer updates), got {every!r}.")
        self.log_dir = log_dir
        self.every = int(every)
        self.schedule = schedule
        self.prefix = prefix
        self._writer = None
        self._bucket = 0

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        self._bucket = _iterations(self.model) // self.every

    def on_train_batch_end(self, batch, logs=None):
        step = _iterations(self.model)
        if step // self.every <= self._bucket:
            return
        self._bucket = step // self.every
        self.write(step, logs)

    def write(self, step, logs):
        """Writes one row of scalars at ``step``."""
        import tensorflow as tf

        with self._writer.as_default():
            for name, value in sorted((logs or {}).items()):
                value = _as_float(value)
                if value is not None and not (name == "lr" and self.schedule is not None):
                    tf.summary.scalar(self.prefix + name, value, step=step)
            if self.schedule is not None:
                lr = self.schedule(step) if callable(self.schedule) else self.schedule
                tf.summary.scalar(self.prefix + "lr", float(keras.ops.convert_to_numpy(lr)), step=step)

    def on_epoch_end(self, epoch, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ReconstructionImages(keras.callbacks.Callback):
    """Writes an ``input | masked | reconstruction`` grid of a fixed batch to
    TensorBoard at the end of each epoch (fixed noise, so epochs compare)."""

    def __init__(self, log_dir, images, mean, std, max_images=8, seed=0):
        super().__init__()
        self.log_dir = log_dir
        self.images = np.asarray(images)[:max_images]
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.seed = seed
        self._writer = None

    def grid(self):
        model = self.model
        n = model.encoder.num_patches
        noise = np.random.default_rng(self.seed).random((len(self.images), n)).astype("float32")
        recon, mask = model.reconstruct(self.images, noise=noise)
        recon = keras.ops.convert_to_numpy(recon)
        mask = keras.ops.convert_to_numpy(mask)

        def to_pixels(x):
            return np.clip(x * self.std + self.mean, 0.0, 1.0)

        inputs = to_pixels(self.images)
        masked = inputs * (1 - mask) + 0.5 * mask
        rows = np.concatenate([inputs, masked, to_pixels(recon)], axis=2)  # side by side
        return rows.reshape((-1,) + rows.shape[2:])[None]  # one tall picture

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "images"))
        picture = self.grid()
        if picture.shape[-1] == 1:
            picture = np.repeat(picture, 3, axis=-1)
        with self._writer.as_default():
            tf.summary.image("reconstruction", picture, step=epoch)
        self._writer.flush()
