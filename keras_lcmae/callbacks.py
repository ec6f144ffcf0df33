"""Training callbacks: lr and throughput logging, step-level TensorBoard
scalars, reconstruction pictures in TensorBoard, periodic checkpoints, a
preemption backup that survives a corrupt newest generation and a diverged
run, the divergence guard, the skipped-files warning."""

import json
import math
import os
import re
import shutil
import time
import warnings
import zipfile

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
        # Written under a temporary name and renamed: a kill mid-write never
        # leaves a truncated ``epoch_NNN.keras`` behind.
        path = os.path.join(self.folder, f"epoch_{epoch + 1:03d}.keras")
        partial = os.path.join(self.folder, f".epoch_{epoch + 1:03d}.partial.keras")
        self.model.save(partial)
        os.replace(partial, path)


_CHECKPOINT_NAME = re.compile(r"epoch_(\d+)\.keras")


def _is_keras_archive(path):
    """A ``.keras`` zip whose central directory reads and that holds a config
    (a truncated file has no central directory). Nothing is loaded."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "config.json" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def last_good_checkpoint(folder):
    """The newest (highest epoch) ``epoch_NNN.keras`` written by
    :class:`PeriodicCheckpoint` in ``folder/checkpoints`` (or in ``folder``
    itself when it is the checkpoints folder), or ``None``.

    A file that is not a readable ``.keras`` archive (e.g. cut short by a kill
    during an older, non-atomic save) is skipped in favour of the one before.
    PeriodicCheckpoint only writes when the epoch's loss is finite, so the
    result is the last checkpoint of a healthy model.

    Example:
    >>> import tempfile
    >>> run = tempfile.TemporaryDirectory()                # a run folder, e.g. "runs/mae"
    >>> last_good_checkpoint(run.name) is None             # nothing saved yet
    True
    >>> folder = os.path.join(run.name, "checkpoints")
    >>> os.makedirs(folder)
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.save(os.path.join(folder, "epoch_001.keras"))
    >>> open(os.path.join(folder, "epoch_002.keras"), "wb").close()   # cut short by a kill
    >>> path = last_good_checkpoint(run.name)
    >>> os.path.relpath(path, run.name)
    'checkpoints/epoch_001.keras'
    >>> model = keras.saving.load_model(path)
    """
    candidates = []
    for directory in (os.path.join(folder, "checkpoints"), folder):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            match = _CHECKPOINT_NAME.fullmatch(name)
            if match:
                candidates.append((int(match.group(1)), os.path.join(directory, name)))
        if candidates:
            break
    for _, path in sorted(candidates, reverse=True):
        if _is_keras_archive(path):
            return path
    return None


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


def _iterations(model):
    """The optimizer's update count (under JAX, reading ``self.model`` in a
    callback first syncs the training state onto the variables)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _as_float(value):
    """A scalar numeric log entry as a float; ``None`` for anything else."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - an odd log entry is simply not numeric
        return None
    if array.size != 1 or array.dtype.kind not in "iuf":
        return None
    return float(array.reshape(()))


def _first_nonfinite(variables):
    """The path of the first float variable holding a NaN or an infinity, or
    ``None``. One reduction per variable on the device, one transfer."""
    floats = [v for v in variables if "float" in str(v.dtype)]
    if not floats:
        return None
    flags = keras.ops.stack([keras.ops.all(keras.ops.isfinite(v.value)) for v in floats])
    for variable, ok in zip(floats, keras.ops.convert_to_numpy(flags)):
        if not ok:
            return getattr(variable, "path", None) or variable.name
    return None


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first batch whose ``loss`` (``monitor``) is NaN or
    infinite, and records where: ``.diverged`` (bool), ``.step`` (the
    optimizer's update count after that batch, i.e. the update that produced
    the non-finite loss is number ``step``), ``.epoch`` (1-based, as Keras
    prints it), ``.batch`` (index in the epoch) and ``.value`` (the loss).
    :meth:`message` says it in words. A replacement for
    ``keras.callbacks.TerminateOnNaN`` that tells you where the run broke.

    Keras' batch logs hold the running mean of the loss since the epoch
    began, so the mean turns non-finite exactly at the first non-finite batch.

    Place it before :class:`SafeBackupAndRestore`, so the stop is requested
    in the same batch; the backup callback watches the same logs itself, so
    it never writes the broken state and keeps the previous backup at the end
    of the run.

    Example:
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x = np.ones((8, 2), "float32")
    >>> x[5] = np.nan                        # in the third batch of 2
    >>> guard = DivergenceGuard()
    >>> history = model.fit(x, np.zeros(8), batch_size=2, epochs=3, shuffle=False, verbose=0,
    ...                     callbacks=[guard])
    >>> guard.diverged, guard.epoch, guard.batch, guard.step
    (True, 1, 2, 3)
    >>> print(guard.message())
    the loss became nan at step 3 (epoch 1)
    """

    def __init__(self, monitor="loss"):
        super().__init__()
        self.monitor = monitor
        self._reset()
        self._epoch = 0

    def _reset(self):
        self.diverged = False
        self.step = self.epoch = self.batch = self.value = None

    def on_train_begin(self, logs=None):
        self._reset()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        value = _as_float((logs or {}).get(self.monitor))
        if self.diverged or value is None or math.isfinite(value):
            return
        model = self.model
        self.diverged, self.value, self.batch, self.epoch = True, value, batch, self._epoch + 1
        self.step = _iterations(model)
        model.stop_training = True
        warnings.warn(f"DivergenceGuard: {self.message()}; stopping training.", RuntimeWarning, stacklevel=2)

    def message(self):
        """``"the loss became nan at step 17 (epoch 3)"``, or that it stayed finite."""
        if not self.diverged:
            return f"the {self.monitor} stayed finite"
        return f"the {self.monitor} became {self.value} at step {self.step} (epoch {self.epoch})"


class _BadBackup(Exception):
    """One backup generation is unusable (the message says why)."""


class SafeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` that survives a damaged backup and
    a diverged run. Same arguments, except ``double_checkpoint`` defaults to
    True (``latest.weights.h5`` + ``training_metadata.json``, and the previous
    generation as ``*.bkp``).

    * At train begin each generation, newest first, is validated for real:
      the metadata must parse as JSON with integer ``epoch`` and ``batch``,
      the weights file must load into the model (``model.load_weights``) and
      hold finite weights. A bad newest generation (e.g. cut short by a kill
      during the write) gives a warning naming the file and the problem, and
      training resumes from the previous generation, which is then copied
      over the newest so the next backup rotates a good one into ``*.bkp``.
      If no generation is usable a ``ValueError`` names the folder, the
      problem of each generation, and says to delete the folder to start
      afresh. (Keras itself only falls back on an ``OSError`` of the weights
      and crashes on bad JSON.) ``.restored`` then says what was loaded.
    * No backup is written once the ``monitor`` entry of the logs (``loss``,
      the running mean since the epoch began) has been non-finite in this
      run, nor when a trainable weight is non-finite: a diverged run can not
      overwrite a good backup with NaN weights. ``.diverged`` records it.
    * Keras deletes the backup folder at every train end that is not an
      exception (``delete_checkpoint=True``), which includes a run stopped by
      ``TerminateOnNaN`` / :class:`DivergenceGuard`. Here a diverged run keeps
      its backup (with a warning), so a rerun with a lower learning rate
      resumes from the last good state.
    * The metadata of a mid-epoch backup written in the first epoch after a
      resume records that epoch (Keras recorded epoch 0 until the first epoch
      end).

    Example (``delete_checkpoint=False`` keeps the backup of a finished run,
    as if it had been interrupted):

    >>> import tempfile
    >>> backup_dir = tempfile.TemporaryDirectory()        # e.g. "runs/mae/backup"
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((8, 2), "float32"), np.zeros(8, "float32")
    >>> backup = SafeBackupAndRestore(backup_dir.name, delete_checkpoint=False)
    >>> _ = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[DivergenceGuard(), backup])
    >>> backup.restored is None                           # a fresh run
    True
    >>> sorted(os.listdir(backup_dir.name))               # two generations
    ['latest.weights.h5', 'latest.weights.h5.bkp', 'training_metadata.json', 'training_metadata.json.bkp']
    >>> open(os.path.join(backup_dir.name, "latest.weights.h5"), "wb").close()   # cut short by a kill
    >>> _ = model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[DivergenceGuard(), backup])
    >>> backup.restored["epoch"], backup.restored["fallback"]    # resumed from the previous one
    (1, True)
    """

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=True, delete_checkpoint=True,
                 monitor="loss"):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=double_checkpoint,
                         delete_checkpoint=delete_checkpoint)
        self.monitor = monitor
        self.diverged = False
        self.restored = None
        self._skip_warned = False

    # -- restore -------------------------------------------------------------

    def _generations(self):
        generations = [(self._weights_path, self._training_metadata_path)]
        if self.double_checkpoint:
            generations.append((self._prev_weights_path, self._prev_training_metadata_path))
        return generations

    @staticmethod
    def _read_metadata(path):
        name = os.path.basename(path)
        if not os.path.exists(path):
            raise _BadBackup(f"{name} is missing")
        try:
            with open(path) as f:
                text = f.read()
            metadata = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise _BadBackup(f"{name} is not valid JSON ({type(e).__name__}: {e})") from None
        ok = isinstance(metadata, dict) and all(
            isinstance(metadata.get(k), int) and not isinstance(metadata.get(k), bool) and metadata[k] >= 0
            for k in ("epoch", "batch")
        )
        if not ok:
            raise _BadBackup(f"{name} lacks integer 'epoch' and 'batch' entries (it holds {text[:80]!r})")
        return metadata

    def _load_weights(self, path):
        name = os.path.basename(path)
        if not os.path.exists(path):
            raise _BadBackup(f"{name} is missing")
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)  # its variables are in the file too
        # Keras loads only files named *.weights.h5: the *.bkp generation is
        # read through a temporary copy (the files themselves stay untouched).
        loadable = path if path.endswith(".weights.h5") else os.path.join(self.backup_dir, ".check.weights.h5")
        try:
            if loadable != path:
                shutil.copyfile(path, loadable)
            model.load_weights(loadable)
        except Exception as e:  # noqa: BLE001 - h5py, keras and OS errors alike mean "unusable"
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise _BadBackup(f"{name} does not load into the model ({type(e).__name__}: {detail})") from None
        finally:
            if loadable != path and os.path.exists(loadable):
                os.remove(loadable)
        bad = _first_nonfinite(model.trainable_variables)
        if bad:
            raise _BadBackup(f"{name} holds non-finite weights ({bad})")

    def on_train_begin(self, logs=None):
        self.diverged, self.restored, self._skip_warned = False, None, False
        model = self.model
        if not model.built:
            raise ValueError(
                "To use SafeBackupAndRestore the model must be built before fit(); "
                f"{model} is not. Build it by calling it on a batch of data."
            )
        generations = self._generations()
        if not any(os.path.exists(p) for pair in generations for p in pair):
            return  # a fresh run
        problems = []
        for index, (weights, metadata_path) in enumerate(generations):
            if not (os.path.exists(weights) or os.path.exists(metadata_path)):
                problems.append("it does not exist")
                continue
            try:
                metadata = self._read_metadata(metadata_path)
                self._load_weights(weights)
            except _BadBackup as e:
                problems.append(str(e))
                continue
            if index:
                warnings.warn(
                    f"The newest backup in {self.backup_dir} is unusable: {'; '.join(problems)}. Resuming from "
                    f"the previous generation ({os.path.basename(weights)}, epoch {metadata['epoch']}).",
                    RuntimeWarning, stacklevel=2,
                )
                for source, target in zip((weights, metadata_path), generations[0]):
                    shutil.copyfile(source, target)
            model._initial_epoch = metadata["epoch"]
            self._current_epoch = metadata["epoch"]
            self.restored = dict(weights=weights, epoch=metadata["epoch"], batch=metadata["batch"],
                                 fallback=bool(index))
            return
        names = ["the newest (latest.weights.h5 + training_metadata.json)",
                 "the previous (*.bkp)"][:len(generations)]
        detail = "; ".join(f"{n}: {p}" for n, p in zip(names, problems))
        raise ValueError(
            f"Cannot resume from the backup folder {self.backup_dir}: no generation is usable ({detail}). "
            f"Delete the folder {self.backup_dir} to start training afresh."
        )

    # -- save ----------------------------------------------------------------

    def _watch(self, logs):
        value = _as_float((logs or {}).get(self.monitor))
        if value is not None and not math.isfinite(value):
            self.diverged = True

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch  # a mid-epoch backup records the epoch it is in

    def on_train_batch_end(self, batch, logs=None):
        self._watch(logs)
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._watch(logs)
        super().on_epoch_end(epoch, logs)

    def _skip(self, reason):
        if not self._skip_warned:
            self._skip_warned = True
            warnings.warn(f"Not writing a backup to {self.backup_dir}: {reason}; the previous backup is kept.",
                          RuntimeWarning, stacklevel=3)

    def _save_model(self):
        if self.diverged:
            return self._skip(f"the {self.monitor} is not finite")
        bad = _first_nonfinite(self.model.trainable_variables)
        if bad:
            self.diverged = True
            return self._skip(f"the weight {bad} is not finite")
        super()._save_model()

    def on_train_end(self, logs=None):
        if self.diverged:
            if self.delete_checkpoint and os.path.exists(self.backup_dir):
                warnings.warn(
                    f"Training diverged: keeping the backup in {self.backup_dir} (written before the divergence); "
                    "rerun with a lower learning rate to resume from it, or delete the folder to start afresh.",
                    RuntimeWarning, stacklevel=2,
                )
            return
        super().on_train_end(logs)


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
    """Switches an MAE/LCMAE with :class:`~keras_lcmae.masking.SelfGuidedMasking`
    from random to informed masks: at the start of each epoch it sets the
    model's non-trainable ``informed_active`` variable to 1 when
    ``epoch >= start_epoch`` and to 0 before (``start_epoch`` defaults to the
    strategy's ``informed_start_epoch``).
    The compiled step reads the variable, so one graph serves both phases, and
    a run resumed by ``BackupAndRestore`` gets the right value for its epoch.

    Example (``fit`` calls ``on_epoch_begin`` itself):

    >>> from keras_lcmae import MAE, SelfGuidedMasking, TransformerDecoder, ViTEncoder
    >>> mae = MAE(ViTEncoder.from_preset("vit_test"), TransformerDecoder(hidden_dim=32, depth=1, num_heads=2),
    ...           masking=SelfGuidedMasking(informed_start_epoch=2))
    >>> schedule = InformedMaskingSchedule()   # mae.fit(..., callbacks=[schedule])
    >>> schedule.set_model(mae)
    >>> for epoch in range(4):
    ...     schedule.on_epoch_begin(epoch)
    ...     print(epoch, float(keras.ops.convert_to_numpy(mae.informed_active)))
    0 0.0
    1 0.0
    2 1.0
    3 1.0
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
                "InformedMaskingSchedule needs a model built with masking=SelfGuidedMasking(...) "
                f"(got masking={getattr(self.model, 'masking', None)!r})."
            )
        return variable

    def on_train_begin(self, logs=None):
        self._variable()

    def on_epoch_begin(self, epoch, logs=None):
        start = self.model.masking.informed_start_epoch if self.start_epoch is None else int(self.start_epoch)
        self._variable().assign(1.0 if epoch >= start else 0.0)


def training_callbacks(output_dir, schedule, batch_size, total_steps=None, backup_every=0, accum_steps=1,
                       log_every=0, before=(), after=()):
    """The callbacks that make a ``fit`` resumable and watchable, in the
    order they must run (``recipes/finetune.py`` and ``recipes/linprobe.py``
    use them as they are; :func:`pretrain_callbacks` adds pretraining's):

    ``TrainingStats`` (``lr``, ``images_per_s`` of ``batch_size`` images a
    ``fit`` step), ``before`` (callbacks whose figures must reach the logs),
    :class:`DivergenceGuard`, :class:`SafeBackupAndRestore` in
    ``output_dir/backup`` every ``backup_every`` optimizer updates (0: at each
    epoch end; two generations), :class:`ResumeReport`, :class:`StopAtStep`
    at ``total_steps`` updates, :class:`StepLogger` in
    ``output_dir/tensorboard/steps`` every ``log_every`` updates (0: none),
    ``after`` (checkpoints, pictures), then TensorBoard's epoch scalars.

    ``accum_steps``: micro-batches per optimizer update (the optimizers'
    ``accum_steps``); ``fit`` steps are micro-batches, so the backup
    interval is counted in them.

    Example:
    >>> from keras_lcmae.optim import WarmupCosine
    >>> callbacks = training_callbacks("runs/ft", WarmupCosine(1e-3, 10, 1000), batch_size=256,
    ...                                total_steps=1000, backup_every=100, log_every=10)
    >>> [type(c).__name__ for c in callbacks]   # nothing is written before model.fit(..., callbacks=callbacks)
    ['TrainingStats', 'DivergenceGuard', 'SafeBackupAndRestore', 'ResumeReport', 'StopAtStep', 'StepLogger',
     'TensorBoard']
    """
    tensorboard = os.path.join(output_dir, "tensorboard")
    save_freq = int(backup_every) * int(accum_steps) or "epoch"
    callbacks = [
        TrainingStats(schedule, batch_size),
        *before,
        DivergenceGuard(),  # before the backup: it stops the run in the batch that diverged
        SafeBackupAndRestore(os.path.join(output_dir, "backup"), save_freq=save_freq, double_checkpoint=True),
        ResumeReport(),
    ]
    if total_steps:
        callbacks.append(StopAtStep(total_steps))
    if log_every:
        callbacks.append(StepLogger(os.path.join(tensorboard, "steps"), log_every, schedule))
    callbacks += [*after, keras.callbacks.TensorBoard(tensorboard, update_freq="epoch")]
    return callbacks


def pretrain_callbacks(
    output_dir, model, schedule, batch_size, save_every=1, skipped=None, preview=None, mean=None, std=None,
    backup_every=0, total_steps=None, monitors=(), log_every=0, accum_steps=1,
):
    """The callbacks of ``recipes/pretrain.py``: :func:`training_callbacks`
    with ``monitors`` (e.g. :class:`KNNMonitor`, :class:`LinearProbeMonitor`)
    and, for a ``masking="self_guided"`` model, :class:`InformedMaskingSchedule`
    and, when files were skipped, :class:`SkippedFilesWarning` before the
    guard; :class:`PeriodicCheckpoint` every ``save_every`` epochs and the
    reconstruction pictures of ``preview`` after it.

    A non-finite loss stops the run (:class:`DivergenceGuard`; its
    ``message()`` says where); the backup (:class:`SafeBackupAndRestore`) is
    then neither overwritten nor deleted, so a rerun with a lower lr resumes
    from the last good state. A damaged newest backup falls back to the
    previous generation."""
    before = list(monitors)
    if getattr(model, "informed_active", None) is not None:
        before.insert(0, InformedMaskingSchedule())
    if skipped is not None:
        before.append(SkippedFilesWarning(skipped))
    after = [PeriodicCheckpoint(os.path.join(output_dir, "checkpoints"), save_every)]
    if preview is not None:
        after.append(ReconstructionImages(os.path.join(output_dir, "tensorboard"), preview, mean, std))
    return training_callbacks(output_dir, schedule, batch_size, total_steps, backup_every, accum_steps, log_every,
                              before, after)
