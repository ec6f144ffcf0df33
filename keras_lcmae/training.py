"""Running a training job at scale: how one optimizer update splits into
micro-batches over replicas and accumulation steps, and the best-checkpoint
callback that survives a resume.

Batch vocabulary (as official MAE's ``eff_batch_size``):

* ``batch_size``: the **effective** global batch of one optimizer update; the
  learning-rate rule ``lr = blr * batch_size / 256`` uses it.
* ``accum_steps`` (K): micro-batches whose mean gradient makes one update.
* ``replicas`` (R): devices that each process a slice of every micro-batch.
* the micro-batch a device sees: ``batch_size / (R * K)``; the dataset yields
  global micro-batches of ``batch_size / K`` images.
"""

import json
import os
import sys

import keras
import numpy as np

from keras_lcmae.backend.keras_internals import SaveHook


class BatchPlan:
    """The split of an effective ``batch_size`` over ``replicas`` devices and
    ``accum_steps`` micro-batches.

    Raises ``ValueError`` naming the arguments when ``batch_size`` is not a
    multiple of ``replicas * accum_steps``.

    Example:
    >>> plan = BatchPlan(1024, replicas=8, accum_steps=4)
    >>> plan.global_micro_batch, plan.per_device_micro_batch
    (256, 32)
    """

    def __init__(self, batch_size, replicas=1, accum_steps=1):
        for name, value in (("batch_size", batch_size), ("replicas", replicas), ("accum_steps", accum_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if batch_size % (replicas * accum_steps):
            raise ValueError(
                f"batch_size={batch_size} is not a multiple of replicas x accum_steps = {replicas} x {accum_steps} "
                f"= {replicas * accum_steps}; choose a batch size that is, or another accum_steps."
            )
        self.batch_size = int(batch_size)
        self.replicas = int(replicas)
        self.accum_steps = int(accum_steps)

    @property
    def global_micro_batch(self):
        """Images per ``fit`` step (one micro-batch over all replicas)."""
        return self.batch_size // self.accum_steps

    @property
    def per_device_micro_batch(self):
        """Images one device processes per forward/backward pass."""
        return self.batch_size // (self.accum_steps * self.replicas)

    def as_dict(self):
        return dict(
            effective_batch=self.batch_size,
            replicas=self.replicas,
            accum_steps=self.accum_steps,
            global_micro_batch=self.global_micro_batch,
            per_device_micro_batch=self.per_device_micro_batch,
        )


def fit_verbosity(stream=None):
    """``verbose`` for ``model.fit``: a progress bar with ETA (1) when the
    stream (stdout by default) is a terminal, one line per epoch (2)
    otherwise (log files, CI)."""
    stream = sys.stdout if stream is None else stream
    try:
        return 1 if stream.isatty() else 2
    except (AttributeError, ValueError):  # a closed or unusual stream
        return 2


class BestCheckpoint(SaveHook, keras.callbacks.ModelCheckpoint):
    """``keras.callbacks.ModelCheckpoint(save_best_only=True)`` whose best
    value outlives the process: it is written next to the checkpoint
    (``<filepath>.best.json``: monitored value and epoch) each time the model
    is saved, and read back at the start of training. A run resumed after
    preemption then replaces ``best.keras`` only with a better model, not
    with its first epoch's.

    Example:
    >>> import tempfile
    >>> run = tempfile.TemporaryDirectory()
    >>> path = os.path.join(run.name, "best.keras")          # e.g. "runs/ft/best.keras"
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((4, 2), "float32"), np.ones(4, "float32")
    >>> _ = model.fit(x, y, validation_data=(x, y), epochs=3, verbose=0,
    ...               callbacks=[BestCheckpoint(path, monitor="val_loss", mode="min")])
    >>> with open(path + ".best.json") as f:
    ...     record = json.load(f)
    >>> record["monitor"], record["epoch"], os.path.exists(path)
    ('val_loss', 3, True)
    >>> resumed = BestCheckpoint(path, monitor="val_loss", mode="min")   # a new process, same run
    >>> resumed.set_model(model)
    >>> resumed.on_train_begin()
    >>> resumed.best == record["value"]                     # only a better model replaces best.keras
    True
    """

    def __init__(self, filepath, monitor="val_loss", mode="auto", **kwargs):
        kwargs.setdefault("save_best_only", True)
        super().__init__(filepath, monitor=monitor, mode=mode, **kwargs)
        self.record_path = f"{filepath}.best.json"

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        try:
            with open(self.record_path) as f:
                record = json.load(f)
            value = float(record["value"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # no record (a fresh run) or an unreadable one: start from scratch
        if record.get("monitor") == self.monitor and os.path.exists(self.filepath) and np.isfinite(value):
            self.best = value

    def after_save(self, epoch, best_before):
        if self.best is not None and self.best != best_before and np.isfinite(self.best):
            tmp = f"{self.record_path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"monitor": self.monitor, "value": float(self.best), "epoch": int(epoch) + 1}, f)
            os.replace(tmp, self.record_path)
