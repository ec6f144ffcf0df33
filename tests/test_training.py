"""keras_lcmae.training: the batch plan, the progress mode and the best
checkpoint that survives a resume."""

import io
import json
import os

import keras
import pytest

from keras_lcmae.training import BatchPlan, BestCheckpoint, fit_verbosity

pytestmark = pytest.mark.tf_only


def test_batch_plan_splits_the_effective_batch():
    plan = BatchPlan(16384, replicas=8, accum_steps=4)
    assert plan.as_dict() == dict(
        effective_batch=16384, replicas=8, accum_steps=4, global_micro_batch=4096, per_device_micro_batch=512
    )
    with pytest.raises(ValueError, match=r"replicas x accum_steps = 2 x 3"):
        BatchPlan(16, replicas=2, accum_steps=3)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="accum_steps"):
            BatchPlan(16, accum_steps=bad)


def test_progress_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert fit_verbosity(Terminal()) == 1
    assert fit_verbosity(io.StringIO()) == 2
    closed = io.StringIO()
    closed.close()
    assert fit_verbosity(closed) == 2


def test_best_checkpoint_keeps_the_best_across_processes(tmp_path):
    """A second run (a resume) replaces best.keras only with a better model:
    the best value is read back from best.keras.best.json."""
    path = str(tmp_path / "best.keras")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")

    def epoch_end(callback, epoch, value):
        callback.on_epoch_end(epoch, {"val_top1": value})

    first = BestCheckpoint(path, monitor="val_top1", mode="max")
    first.set_model(model)
    first.on_train_begin()
    epoch_end(first, 0, 0.5)
    epoch_end(first, 1, 0.7)
    epoch_end(first, 2, 0.6)
    saved = os.path.getmtime(path)
    assert json.load(open(f"{path}.best.json")) == {"monitor": "val_top1", "value": 0.7, "epoch": 2}

    resumed = BestCheckpoint(path, monitor="val_top1", mode="max")
    resumed.set_model(model)
    resumed.on_train_begin()
    assert resumed.best == pytest.approx(0.7)
    epoch_end(resumed, 3, 0.65)  # worse than the first process's best: kept as it is
    assert os.path.getmtime(path) == saved
    epoch_end(resumed, 4, 0.8)
    assert json.load(open(f"{path}.best.json"))["value"] == pytest.approx(0.8)

    os.remove(path)  # a record without its checkpoint is not trusted
    fresh = BestCheckpoint(path, monitor="val_top1", mode="max")
    fresh.set_model(model)
    fresh.on_train_begin()
    assert fresh.best is None  # Keras starts from scratch: the next epoch is saved
