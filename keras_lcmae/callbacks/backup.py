"""Recovery: the divergence guard, a preemption backup that survives a
damaged newest generation and a diverged run, and the resume report."""

import json
import math
import os
import shutil
import warnings

import keras

from keras_lcmae.backend.keras_callbacks import (
    SaveVeto,
    backup_generations,
    initial_epoch,
    set_backup_epoch,
    set_initial_epoch,
)
from keras_lcmae.callbacks._values import _as_float, _first_nonfinite, _iterations


class ResumeReport(keras.callbacks.Callback):
    """Prints one JSON line ``{"resumed": {"epoch": E, "step": S}}`` when
    training starts from a backup (place it after ``BackupAndRestore``)."""

    def on_train_begin(self, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step:
            epoch = int(initial_epoch(self.model) or 0)
            print(json.dumps({"resumed": {"epoch": epoch, "step": step}}), flush=True)


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
    >>> import numpy as np
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


class SafeBackupAndRestore(SaveVeto, keras.callbacks.BackupAndRestore):
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
    >>> import numpy as np
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

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=True, delete_checkpoint=True, monitor="loss"):
        super().__init__(
            backup_dir, save_freq=save_freq, double_checkpoint=double_checkpoint, delete_checkpoint=delete_checkpoint
        )
        self.monitor = monitor
        self.diverged = False
        self.restored = None
        self._skip_warned = False

    # -- restore -------------------------------------------------------------

    def _generations(self):
        generations = backup_generations(self)
        return generations if self.double_checkpoint else generations[:1]

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
        except Exception as e:  # h5py, keras and OS errors alike mean "unusable"
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
                    RuntimeWarning,
                    stacklevel=2,
                )
                for source, target in zip((weights, metadata_path), generations[0]):
                    shutil.copyfile(source, target)
            set_initial_epoch(model, metadata["epoch"])
            set_backup_epoch(self, metadata["epoch"])
            self.restored = dict(
                weights=weights, epoch=metadata["epoch"], batch=metadata["batch"], fallback=bool(index)
            )
            return
        names = ["the newest (latest.weights.h5 + training_metadata.json)", "the previous (*.bkp)"][: len(generations)]
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
        set_backup_epoch(self, epoch)  # a mid-epoch backup records the epoch it is in

    def on_train_batch_end(self, batch, logs=None):
        self._watch(logs)
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._watch(logs)
        super().on_epoch_end(epoch, logs)

    def _skip(self, reason):
        if not self._skip_warned:
            self._skip_warned = True
            warnings.warn(
                f"Not writing a backup to {self.backup_dir}: {reason}; the previous backup is kept.",
                RuntimeWarning,
                stacklevel=4,
            )

    def may_save(self):
        """Whether a backup may be written now (:class:`SaveVeto` asks before
        each save): not once the run diverged or a weight is non-finite."""
        if self.diverged:
            self._skip(f"the {self.monitor} is not finite")
            return False
        bad = _first_nonfinite(self.model.trainable_variables)
        if bad:
            self.diverged = True
            self._skip(f"the weight {bad} is not finite")
            return False
        return True

    def on_train_end(self, logs=None):
        if self.diverged:
            if self.delete_checkpoint and os.path.exists(self.backup_dir):
                warnings.warn(
                    f"Training diverged: keeping the backup in {self.backup_dir} (written before the divergence); "
                    "rerun with a lower learning rate to resume from it, or delete the folder to start afresh.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        super().on_train_end(logs)
