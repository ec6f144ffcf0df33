"""Training callbacks: lr and throughput logging, reconstruction pictures in
TensorBoard, periodic checkpoints, the skipped-files warning."""

import json
import os
import time

import keras
import numpy as np


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


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Saves ``checkpoints/epoch_NNN.keras`` every ``every`` epochs (only when
    the loss is finite, so a NaN never overwrites a good checkpoint)."""

    def __init__(self, folder, every=1):
        super().__init__()
        self.folder = folder
        self.every = max(int(every), 1)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or not np.isfinite((logs or {}).get("loss", 0.0)):
            return
        os.makedirs(self.folder, exist_ok=True)
        self.model.save(os.path.join(self.folder, f"epoch_{epoch + 1:03d}.keras"))


class StopAtStep(keras.callbacks.Callback):
    """Stops training once the optimizer has taken ``total_steps`` steps.

    After a resume from a mid-epoch backup, Keras replays the interrupted
    epoch from its first batch while the optimizer step (and so the lr
    schedule) continues from the backup; this keeps the run at exactly the
    planned number of steps (the last epoch is then shorter)."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = int(total_steps)

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.total_steps:
            self.model.stop_training = True


class ResumeReport(keras.callbacks.Callback):
    """Prints one JSON line ``{"resumed": {"epoch": E, "step": S}}`` when
    training starts from a backup (place it after ``BackupAndRestore``)."""

    def on_train_begin(self, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step:
            epoch = int(getattr(self.model, "_initial_epoch", None) or 0)
            print(json.dumps({"resumed": {"epoch": epoch, "step": step}}), flush=True)


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
        to_pixels = lambda x: np.clip(x * self.std + self.mean, 0.0, 1.0)  # noqa: E731
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


class KNNMonitor(keras.callbacks.Callback):
    """Weighted kNN accuracy (cosine, ``k`` neighbours, votes
    ``exp(sim / temperature)``) of the encoder's features on a held-out
    labelled split, written into the epoch logs as ``knn_top1`` (place it
    before the TensorBoard callback). Features are the ``[CLS]`` token
    (``pool="cls"``) or the mean patch token of full, unmasked images.

    kNN understates MAE features (they are not linearly clustered until
    finetuned or probed), so the recipe shows it next to the online probe.
    """

    def __init__(self, bank_images, bank_labels, query_images, query_labels, num_classes, k=20, temperature=0.07,
                 pool="cls", every=1, batch_size=256):
        super().__init__()
        self.bank = (np.asarray(bank_images, np.float32), np.asarray(bank_labels))
        self.query = (np.asarray(query_images, np.float32), np.asarray(query_labels))
        self.num_classes = int(num_classes)
        self.k, self.temperature, self.pool = int(k), float(temperature), pool
        self.every = max(int(every), 1)
        self.batch_size = int(batch_size)

    def accuracy(self):
        from keras_lcmae.evaluation import extract_features, knn_accuracy  # noqa: PLC0415

        bank, _ = extract_features(self.model, self.bank[0], pool=self.pool, batch_size=self.batch_size)
        query, _ = extract_features(self.model, self.query[0], pool=self.pool, batch_size=self.batch_size)
        return knn_accuracy(bank, self.bank[1], query, self.query[1], self.num_classes, k=self.k,
                            temperature=self.temperature)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and (epoch + 1) % self.every == 0:
            logs["knn_top1"] = float(self.accuracy())


class LinearProbeMonitor(keras.callbacks.Callback):
    """A linear probe of the encoder's frozen features on a held-out labelled
    split, refit at the end of every ``every`` epochs and written into the
    logs as ``linprobe_top1``: features of full images (``[CLS]`` or mean
    patch token), standardised with the bank's statistics (BatchNorm without
    affine, as the official probe), then multinomial logistic regression by
    full-batch gradient descent on the bank, scored on the query set.

    It complements :class:`KNNMonitor`: MAE features are far better linearly
    than by nearest neighbours. It reads the encoder only (its weights are
    never touched) and costs two feature passes and a few hundred small
    matrix products per evaluation.
    """

    def __init__(self, bank_images, bank_labels, query_images, query_labels, num_classes, pool="cls", every=1,
                 steps=300, learning_rate=0.5, l2=1e-4, batch_size=256):
        super().__init__()
        self.bank = (np.asarray(bank_images, np.float32), np.asarray(bank_labels))
        self.query = (np.asarray(query_images, np.float32), np.asarray(query_labels))
        self.num_classes = int(num_classes)
        self.pool = pool
        self.every = max(int(every), 1)
        self.steps, self.learning_rate, self.l2 = int(steps), float(learning_rate), float(l2)
        self.batch_size = int(batch_size)

    def accuracy(self):
        from keras_lcmae.evaluation import extract_features, linear_probe_accuracy  # noqa: PLC0415

        bank, _ = extract_features(self.model, self.bank[0], pool=self.pool, batch_size=self.batch_size)
        query, _ = extract_features(self.model, self.query[0], pool=self.pool, batch_size=self.batch_size)
        return linear_probe_accuracy(bank, self.bank[1], query, self.query[1], self.num_classes,
                                     steps=self.steps, learning_rate=self.learning_rate, l2=self.l2)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and (epoch + 1) % self.every == 0:
            logs["linprobe_top1"] = float(self.accuracy())


class OnlineLinearProbe(keras.callbacks.Callback):
    """An online linear probe: a linear head on stop-gradient encoder
    features, trained alongside pretraining (one SGD step every ``every``
    training steps on a labelled batch) and scored on a held-out split at each
    epoch end as ``online_probe_top1`` (place it before the TensorBoard
    callback). ``online_probe_train_top1`` is the head's accuracy on the
    batches it trained on during the epoch (before each step).

    The head (:class:`keras_lcmae.evaluation.OnlineLinearHead`: BatchNorm
    without affine, then linear, SGD with momentum) lives in numpy, so no
    gradient can reach the encoder; features are the ``[CLS]`` token or the
    mean patch token of full, unmasked images in inference mode. The labelled
    batches cycle through ``train_images`` in an order drawn from ``seed``.
    Cost: one encoder forward pass of ``batch_size`` full images per probe
    step. The head is not part of the backup: a resumed run starts it afresh.
    """

    def __init__(self, train_images, train_labels, query_images, query_labels, num_classes, pool="cls", every=1,
                 batch_size=64, learning_rate=0.1, seed=0):
        super().__init__()
        self.train = (np.asarray(train_images, np.float32), np.asarray(train_labels).reshape(-1))
        self.query = (np.asarray(query_images, np.float32), np.asarray(query_labels).reshape(-1))
        if len(self.train[0]) < 2 or len(self.train[0]) != len(self.train[1]):
            raise ValueError("OnlineLinearProbe needs at least 2 labelled training images, one label each.")
        self.num_classes = int(num_classes)
        self.pool = pool
        self.every = max(int(every), 1)
        self.batch_size = int(min(batch_size, len(self.train[0])))
        self.learning_rate = float(learning_rate)
        self.rng = np.random.default_rng(seed)
        self.head = None
        self._order, self._pos, self._seen = None, 0, 0

    def _features(self, images):
        from keras_lcmae.evaluation import extract_features  # noqa: PLC0415

        return extract_features(self.model, images, pool=self.pool, batch_size=256)[0]

    def _next_batch(self):
        n = len(self.train[0])
        if self._order is None or self._pos + self.batch_size > n:
            self._order, self._pos = self.rng.permutation(n), 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.train[0][idx], self.train[1][idx]

    def on_epoch_begin(self, epoch, logs=None):
        self._correct, self._count = 0.0, 0

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if (self._seen - 1) % self.every:
            return
        x, y = self._next_batch()
        features = self._features(x)
        if self.head is None:
            from keras_lcmae.evaluation import OnlineLinearHead  # noqa: PLC0415

            self.head = OnlineLinearHead(features.shape[1], self.num_classes, self.learning_rate)
        self._correct += self.head.update(features, y) * len(y)
        self._count += len(y)

    def accuracy(self):
        """Top-1 of the current head on the held-out split."""
        if self.head is None:
            return float("nan")
        return float(np.mean(self.head.predict(self._features(self.query[0])) == self.query[1]))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["online_probe_top1"] = self.accuracy()
        if self._count:
            logs["online_probe_train_top1"] = self._correct / self._count


class InformedMaskingSchedule(keras.callbacks.Callback):
    """Switches a ``masking="self_guided"`` MAE/LCMAE from random to informed
    masks: at the start of each epoch it sets the model's non-trainable
    ``informed_active`` variable to 1 when ``epoch >= start_epoch`` and to 0
    before (``start_epoch`` defaults to the model's ``informed_start_epoch``).
    The compiled step reads the variable, so one graph serves both phases, and
    a run resumed by ``BackupAndRestore`` gets the right value for its epoch.

    Example:
    >>> schedule = InformedMaskingSchedule()   # model.fit(..., callbacks=[schedule])
    """

    def __init__(self, start_epoch=None):
        super().__init__()
        if start_epoch is not None and (isinstance(start_epoch, bool) or int(start_epoch) != start_epoch
                                        or start_epoch < 0):
            raise ValueError(f"start_epoch must be an integer >= 0 or None (the model's), got {start_epoch!r}.")
        self.start_epoch = start_epoch

    def _variable(self):
        variable = getattr(self.model, "informed_active", None)
        if variable is None:
            raise ValueError(
                "InformedMaskingSchedule needs a model built with masking='self_guided' "
                f"(got masking={getattr(self.model, 'masking', None)!r})."
            )
        return variable

    def on_train_begin(self, logs=None):
        self._variable()

    def on_epoch_begin(self, epoch, logs=None):
        start = self.model.informed_start_epoch if self.start_epoch is None else int(self.start_epoch)
        self._variable().assign(1.0 if epoch >= start else 0.0)


def pretrain_callbacks(
    output_dir, model, schedule, batch_size, save_every=1, skipped=None, preview=None, mean=None, std=None,
    backup_every=0, total_steps=None, monitors=(),
):
    """The callbacks of ``recipes/pretrain.py``, in the order they must run.

    ``backup_every``: steps between preemption backups in ``output_dir/backup``
    (0: at each epoch end). Two generations are kept, so a kill during a
    write falls back to the previous one. ``total_steps`` stops the run at
    exactly that many optimizer steps (see :class:`StopAtStep`). ``monitors``
    (e.g. :class:`KNNMonitor`, :class:`LinearProbeMonitor`) run before the
    TensorBoard callback so that their figures are logged. A
    ``masking="self_guided"`` model also gets :class:`InformedMaskingSchedule`."""
    callbacks = [TrainingStats(schedule, batch_size), *monitors]
    if getattr(model, "masking", "random") == "self_guided":
        callbacks.insert(0, InformedMaskingSchedule())
    if skipped is not None:
        callbacks.append(SkippedFilesWarning(skipped))
    callbacks += [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.BackupAndRestore(
            os.path.join(output_dir, "backup"), save_freq=int(backup_every) or "epoch", double_checkpoint=True
        ),
        ResumeReport(),
        PeriodicCheckpoint(os.path.join(output_dir, "checkpoints"), save_every),
    ]
    if total_steps:
        callbacks.append(StopAtStep(total_steps))
    if preview is not None:
        callbacks.append(ReconstructionImages(os.path.join(output_dir, "tensorboard"), preview, mean, std))
    callbacks.append(keras.callbacks.TensorBoard(os.path.join(output_dir, "tensorboard"), update_freq="epoch"))
    return callbacks
