"""SafeBackupAndRestore (damaged backups, diverged runs), DivergenceGuard,
StepLogger and last_good_checkpoint, on a tiny Dense model (every backend)."""

import json
import os
import re

import keras
import numpy as np
import pytest

from keras_lcmae.callbacks import (
    DivergenceGuard,
    PeriodicCheckpoint,
    SafeBackupAndRestore,
    StepLogger,
    last_good_checkpoint,
)

STEPS = 8  # batches per epoch: 32 samples of batch 4
BATCH = 4


def tiny_model(lr=0.05):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(STEPS * BATCH, 4)).astype("float32")
    return x, (x @ np.array([1.0, -2.0, 0.5, 0.0], "float32"))[:, None]


def iterations(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def weights(model):
    return [np.array(w) for w in model.get_weights()]


class EpochWeights(keras.callbacks.Callback):
    """Weights after each epoch (key: epochs done) and at train begin."""

    def __init__(self):
        super().__init__()
        self.at = {}

    def on_train_begin(self, logs=None):
        self.begin = (weights(self.model), iterations(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.at[epoch + 1] = weights(self.model)


class StepWeights(keras.callbacks.Callback):
    """Weights and logs after each optimizer update (key: update count)."""

    def __init__(self):
        super().__init__()
        self.at, self.logs = {}, {}

    def on_train_batch_end(self, batch, logs=None):
        step = iterations(self.model)
        self.at[step], self.logs[step] = weights(self.model), dict(logs or {})


class Interrupt(keras.callbacks.Callback):
    """Raises after the batch ``batch`` of epoch ``epoch`` (a simulated kill)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.stop, self._epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self._epoch, batch) == self.stop:
            raise KeyboardInterrupt("simulated kill")


def two_generations(folder):
    """Trains 2 epochs with epoch backups kept: newest = epoch 2, .bkp = epoch 1.
    Returns the weights after each epoch."""
    record = EpochWeights()
    x, y = data()
    tiny_model().fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[SafeBackupAndRestore(folder, delete_checkpoint=False), record],
    )
    assert json.load(open(os.path.join(folder, "training_metadata.json")))["epoch"] == 2
    assert json.load(open(os.path.join(folder, "training_metadata.json.bkp")))["epoch"] == 1
    return record.at


def resume(folder, epochs=4):
    model = tiny_model()
    record = EpochWeights()
    backup = SafeBackupAndRestore(folder)
    x, y = data()
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[backup, record])
    return backup, record, history


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def garbage_metadata(folder):
    with open(os.path.join(folder, "training_metadata.json"), "w") as f:
        f.write('{"epoch": 2, "bat')  # cut short mid-write


def truncate_weights(folder, suffix=""):
    path = os.path.join(folder, "latest.weights.h5" + suffix)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize(
    "damage,file",
    [(garbage_metadata, "training_metadata.json"), (truncate_weights, "latest.weights.h5")],
    ids=["bad_json", "truncated_h5"],
)
def test_a_damaged_newest_backup_falls_back_to_the_previous_generation(tmp_path, damage, file):
    folder = str(tmp_path / "backup")
    after = two_generations(folder)
    damage(folder)
    with pytest.warns(RuntimeWarning, match=re.escape(file)) as caught:
        backup, record, history = resume(folder)
    message = next(str(w.message) for w in caught if "unusable" in str(w.message))
    assert folder in message and "previous generation" in message and "epoch 1" in message
    assert backup.restored == dict(
        weights=os.path.join(folder, "latest.weights.h5.bkp"), epoch=1, batch=0, fallback=True
    )
    start_weights, start_step = record.begin
    assert_same(start_weights, after[1])  # the older generation's weights, not the newest's, nor fresh ones
    assert start_step == STEPS  # its optimizer state too
    assert len(history.history["loss"]) == 3  # epochs 2, 3, 4 of 4: resumed from epoch 1
    assert not os.path.exists(folder)  # a finished run removes its backup, as Keras does


def test_the_fallback_is_copied_over_the_damaged_generation(tmp_path):
    """After a fallback the next rotation must move a good generation into
    *.bkp, not the damaged one: kill the resumed run right after its first
    backup and damage the newest again; the rerun still resumes."""
    folder = str(tmp_path / "backup")
    two_generations(folder)
    garbage_metadata(folder)
    x, y = data()
    with pytest.warns(RuntimeWarning, match="unusable"), pytest.raises(KeyboardInterrupt):
        tiny_model().fit(
            x,
            y,
            batch_size=BATCH,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[SafeBackupAndRestore(folder, save_freq=2), Interrupt(1, 1)],
        )
    assert json.load(open(os.path.join(folder, "training_metadata.json.bkp")))["epoch"] == 1  # the good one
    truncate_weights(folder)
    with pytest.warns(RuntimeWarning, match="latest.weights.h5"):
        backup, _, _ = resume(folder)
    assert backup.restored["fallback"] and backup.restored["epoch"] == 1


def test_both_generations_damaged_names_the_folder(tmp_path):
    folder = str(tmp_path / "backup")
    two_generations(folder)
    garbage_metadata(folder)
    truncate_weights(folder, ".bkp")
    with pytest.raises(ValueError, match=re.escape(folder)) as error:
        resume(folder)
    text = str(error.value)
    assert "training_metadata.json is not valid JSON" in text
    assert "latest.weights.h5.bkp does not load" in text
    assert "Delete the folder" in text


def test_a_single_damaged_generation_without_bkp_raises(tmp_path):
    folder = str(tmp_path / "backup")
    x, y = data()
    tiny_model().fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[SafeBackupAndRestore(folder, delete_checkpoint=False)]
    )
    assert not os.path.exists(os.path.join(folder, "latest.weights.h5.bkp"))
    with open(os.path.join(folder, "training_metadata.json"), "w") as f:
        f.write('{"step": 3}')
    with pytest.raises(ValueError, match="lacks integer 'epoch' and 'batch'.*the previous .*: it does not exist"):
        resume(folder)


def test_a_mid_epoch_backup_after_a_resume_records_its_epoch(tmp_path):
    """Keras' BackupAndRestore wrote epoch 0 for a mid-epoch backup in the
    first epoch after a resume, so a second kill restarted the epochs."""
    folder = str(tmp_path / "backup")
    x, y = data()
    fit = dict(batch_size=BATCH, epochs=4, shuffle=False, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        tiny_model().fit(x, y, callbacks=[SafeBackupAndRestore(folder, save_freq=3), Interrupt(1, 5)], **fit)
    assert json.load(open(os.path.join(folder, "training_metadata.json")))["epoch"] == 1
    with pytest.raises(KeyboardInterrupt):  # resumed at epoch 1; killed again in it, after a backup
        tiny_model().fit(x, y, callbacks=[SafeBackupAndRestore(folder, save_freq=3), Interrupt(1, 6)], **fit)
    assert json.load(open(os.path.join(folder, "training_metadata.json")))["epoch"] == 1


def nan_batches(bad_step):
    """An endless stream of batches; the ``bad_step``-th (1-based) has a NaN target."""
    x, y = data()
    step = 0
    while True:
        for i in range(STEPS):
            step += 1
            yb = y[i * BATCH : (i + 1) * BATCH].copy()
            if step == bad_step:
                yb[0, 0] = np.nan  # (a NaN input can vanish: TensorFlow's relu maps it to 0)
            yield x[i * BATCH : (i + 1) * BATCH], yb


def test_divergence_stops_and_keeps_a_finite_backup(tmp_path):
    folder = str(tmp_path / "backup")
    model = tiny_model()
    guard, backup, steps = DivergenceGuard(), SafeBackupAndRestore(folder, save_freq=4), StepWeights()
    with pytest.warns(RuntimeWarning) as caught:
        history = model.fit(
            nan_batches(20), steps_per_epoch=STEPS, epochs=5, shuffle=False, verbose=0, callbacks=[guard, backup, steps]
        )
    assert guard.diverged and guard.step == 20 and guard.epoch == 3 and guard.batch == 3
    assert guard.message() == "the loss became nan at step 20 (epoch 3)"
    assert iterations(model) == 20 and len(history.history["loss"]) == 3  # stopped in that batch
    assert not np.isfinite(weights(model)[0]).all()  # the NaN batch really broke the weights
    assert backup.diverged
    texts = [str(w.message) for w in caught]
    assert any("Not writing a backup" in t for t in texts)  # the backup due at step 20 was skipped
    assert any("keeping the backup" in t for t in texts)
    assert os.path.exists(folder)  # not deleted at train end
    # the backup is the last one before the divergence (step 16) and finite
    assert json.load(open(os.path.join(folder, "training_metadata.json"))) == {"epoch": 1, "batch": 7}
    check = tiny_model()
    check.load_weights(os.path.join(folder, "latest.weights.h5"))
    assert iterations(check) == 16
    assert_same(weights(check), steps.at[16])
    assert all(np.isfinite(w).all() for w in weights(check))

    # the user lowers the lr and reruns: it resumes from that backup
    rerun = tiny_model(lr=0.01)
    record = EpochWeights()
    x, y = data()
    rerun.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[DivergenceGuard(), SafeBackupAndRestore(folder), record],
    )
    assert record.begin[1] == 16 and all(np.isfinite(w).all() for w in weights(rerun))
    assert not os.path.exists(folder)  # this one finished: the backup is removed


class PoisonWeights(keras.callbacks.Callback):
    """Sets a kernel to NaN after update ``step`` (placed before the backup)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        model = self.model
        if iterations(model) == self.step:
            kernel = model.layers[1].kernel  # (the first one's NaN would vanish in TensorFlow's relu)
            kernel.assign(np.full(tuple(kernel.shape), np.nan, "float32"))


def test_nonfinite_weights_under_a_finite_loss_are_not_backed_up(tmp_path):
    """The update that breaks the weights can still report a finite loss (it
    was computed before the update): the backup checks the weights too."""
    folder = str(tmp_path / "backup")
    x, y = data()
    guard, backup, steps = DivergenceGuard(), SafeBackupAndRestore(folder, save_freq=2), StepWeights()
    with pytest.warns(RuntimeWarning) as caught:
        tiny_model().fit(
            x,
            y,
            batch_size=BATCH,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[steps, PoisonWeights(6), guard, backup],
        )
    texts = " | ".join(str(w.message) for w in caught)
    assert re.search("Not writing a backup .*: the weight .*kernel is not finite", texts), texts
    assert "the loss became nan at step 7 (epoch 1)" in texts and "keeping the backup" in texts
    assert guard.diverged and guard.step == 7  # the next batch's loss is NaN
    assert np.isfinite(steps.logs[6]["loss"])
    check = tiny_model()
    check.load_weights(os.path.join(folder, "latest.weights.h5"))
    assert iterations(check) == 4


def read_scalars(folder):
    import tensorflow as tf

    scalars = {}
    for name in os.listdir(folder):
        if "tfevents" in name:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
                for value in event.summary.value:
                    number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                    scalars.setdefault(value.tag, {})[event.step] = float(number)
    return scalars


def test_step_logger_writes_logs_and_lr_every_n_updates(tmp_path):
    from keras_lcmae.optim import WarmupCosine

    schedule = WarmupCosine(0.05, 4, 2 * STEPS)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse", metrics=["mae"])
    steps = StepWeights()
    x, y = data()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[StepLogger(str(tmp_path), every=3, schedule=schedule), steps],
    )
    scalars = read_scalars(str(tmp_path))
    assert {"step/loss", "step/mae", "step/lr"} <= set(scalars), sorted(scalars)
    expected = [3, 6, 9, 12, 15]
    for tag in ("step/loss", "step/mae", "step/lr"):
        assert sorted(scalars[tag]) == expected, tag
    for step in expected:
        assert scalars["step/loss"][step] == pytest.approx(steps.logs[step]["loss"], rel=1e-6)
        assert scalars["step/mae"][step] == pytest.approx(steps.logs[step]["mae"], rel=1e-6)
        assert scalars["step/lr"][step] == pytest.approx(float(keras.ops.convert_to_numpy(schedule(step))), rel=1e-6)
    # the batch logs are running means since the epoch began (documented)
    first = [steps.logs[s]["loss"] for s in range(1, STEPS + 1)]
    assert steps.logs[9]["loss"] != pytest.approx(first[-1])  # the mean restarted with the epoch


def test_step_logger_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="every"):
        StepLogger("/tmp/unused", every=0)


@pytest.mark.tf_only
def test_last_good_checkpoint(tmp_path):
    folder = str(tmp_path)
    assert last_good_checkpoint(folder) is None
    model = tiny_model()
    x, y = data()
    model.fit(
        x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[PeriodicCheckpoint(os.path.join(folder, "checkpoints"))]
    )
    names = sorted(os.listdir(os.path.join(folder, "checkpoints")))
    assert names == ["epoch_001.keras", "epoch_002.keras"]  # no partial files left behind
    assert last_good_checkpoint(folder) == os.path.join(folder, "checkpoints", "epoch_002.keras")
    assert last_good_checkpoint(os.path.join(folder, "checkpoints")) == last_good_checkpoint(folder)
    with open(os.path.join(folder, "checkpoints", "epoch_010.keras"), "wb") as f:
        f.write(b"PK\x03\x04 cut short")  # newer, but not a readable archive
    assert last_good_checkpoint(folder) == os.path.join(folder, "checkpoints", "epoch_002.keras")
    keras.saving.load_model(last_good_checkpoint(folder))


@pytest.mark.tf_only
def test_pretrain_callbacks_guard_the_backup_and_log_steps_on_request(tmp_path):
    from keras_lcmae.callbacks import pretrain_callbacks
    from keras_lcmae.optim import WarmupCosine

    schedule = WarmupCosine(1e-3, 1, 10)
    kinds = [type(c).__name__ for c in pretrain_callbacks(str(tmp_path), tiny_model(), schedule, 4)]
    assert "TerminateOnNaN" not in kinds and "BackupAndRestore" not in kinds and "StepLogger" not in kinds
    assert kinds.index("DivergenceGuard") < kinds.index("SafeBackupAndRestore") < kinds.index("ResumeReport")
    callbacks = pretrain_callbacks(str(tmp_path), tiny_model(), schedule, 4, log_every=25)
    logger = next(c for c in callbacks if isinstance(c, StepLogger))
    assert logger.every == 25 and logger.schedule is schedule
    assert logger.log_dir == os.path.join(str(tmp_path), "tensorboard", "steps")
