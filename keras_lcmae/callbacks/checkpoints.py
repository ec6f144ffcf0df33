"""Periodic ``.keras`` checkpoints, written atomically, and the newest
readable one of a run."""

import os
import re
import zipfile

import keras
import numpy as np


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
