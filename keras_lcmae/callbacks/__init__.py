"""Training callbacks.

Every name is importable from ``keras_lcmae.callbacks``; the modules hold
them by concern:

* :mod:`~keras_lcmae.callbacks.checkpoints`: :class:`PeriodicCheckpoint`,
  :func:`last_good_checkpoint`;
* :mod:`~keras_lcmae.callbacks.backup`: :class:`DivergenceGuard`,
  :class:`SafeBackupAndRestore` (a preemption backup that survives a corrupt
  newest generation and a diverged run), :class:`ResumeReport`;
* :mod:`~keras_lcmae.callbacks.logs`: :class:`TrainingStats` (lr and
  throughput), :class:`StepLogger` (step-level TensorBoard scalars),
  :class:`ReconstructionImages`, :class:`SkippedFilesWarning`;
* :mod:`~keras_lcmae.callbacks.monitors`: :class:`KNNMonitor`,
  :class:`LinearProbeMonitor`, :class:`OnlineLinearProbe`;
* :mod:`~keras_lcmae.callbacks.schedules`: :class:`StopAtStep`,
  :class:`InformedMaskingSchedule`;
* :mod:`~keras_lcmae.callbacks.defaults`: :func:`training_callbacks` and
  :func:`pretrain_callbacks`, the lists of the recipes.
"""

from keras_lcmae.callbacks.backup import DivergenceGuard, ResumeReport, SafeBackupAndRestore
from keras_lcmae.callbacks.checkpoints import PeriodicCheckpoint, last_good_checkpoint
from keras_lcmae.callbacks.defaults import pretrain_callbacks, training_callbacks
from keras_lcmae.callbacks.logs import ReconstructionImages, SkippedFilesWarning, StepLogger, TrainingStats
from keras_lcmae.callbacks.monitors import KNNMonitor, LinearProbeMonitor, OnlineLinearProbe
from keras_lcmae.callbacks.schedules import InformedMaskingSchedule, StopAtStep

__all__ = [
    "DivergenceGuard",
    "InformedMaskingSchedule",
    "KNNMonitor",
    "LinearProbeMonitor",
    "OnlineLinearProbe",
    "PeriodicCheckpoint",
    "ReconstructionImages",
    "ResumeReport",
    "SafeBackupAndRestore",
    "SkippedFilesWarning",
    "StepLogger",
    "StopAtStep",
    "TrainingStats",
    "last_good_checkpoint",
    "pretrain_callbacks",
    "training_callbacks",
]
