"""The callback lists of the recipes, in the order they must run."""

import os

import keras

from keras_lcmae.callbacks.backup import DivergenceGuard, ResumeReport, SafeBackupAndRestore
from keras_lcmae.callbacks.checkpoints import PeriodicCheckpoint
from keras_lcmae.callbacks.logs import ReconstructionImages, SkippedFilesWarning, StepLogger, TrainingStats
from keras_lcmae.callbacks.schedules import InformedMaskingSchedule, StopAtStep


def training_callbacks(
    output_dir, schedule, batch_size, total_steps=None, backup_every=0, accum_steps=1, log_every=0, before=(), after=()
):
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
    output_dir,
    model,
    schedule,
    batch_size,
    save_every=1,
    skipped=None,
    preview=None,
    mean=None,
    std=None,
    backup_every=0,
    total_steps=None,
    monitors=(),
    log_every=0,
    accum_steps=1,
):
    """The callbacks of ``recipes/pretrain.py``: :func:`training_callbacks`
    with ``monitors`` (e.g. :class:`KNNMonitor`, :class:`LinearProbeMonitor`)
    and, for a model with self-guided masking, :class:`InformedMaskingSchedule`
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
    return training_callbacks(
        output_dir, schedule, batch_size, total_steps, backup_every, accum_steps, log_every, before, after
    )
