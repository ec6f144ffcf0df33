"""The private parts of Keras' callbacks that :mod:`keras_lcmae.callbacks`
relies on, in one place, so that a Keras upgrade that renames them breaks
here, visibly, and nowhere else.

``keras.callbacks.BackupAndRestore`` (Keras 3) keeps its file paths, the
epoch it records and its save step in private attributes and a private
method, and restores a run by setting the model's private ``_initial_epoch``
(where ``fit`` starts its epoch loop). :class:`~keras_lcmae.callbacks.SafeBackupAndRestore`
validates and restores backups itself and vetoes saves after a divergence,
which needs all of them.
"""


def backup_generations(callback):
    """``[(weights, metadata), (previous weights, previous metadata)]``: the
    files of a ``BackupAndRestore`` callback's newest backup generation and of
    the previous one (``*.bkp``), from its private ``_weights_path``,
    ``_training_metadata_path``, ``_prev_weights_path`` and
    ``_prev_training_metadata_path``."""
    return [
        (callback._weights_path, callback._training_metadata_path),
        (callback._prev_weights_path, callback._prev_training_metadata_path),
    ]


def set_backup_epoch(callback, epoch):
    """Sets the epoch a ``BackupAndRestore`` callback writes into
    ``training_metadata.json`` at its next save (private ``_current_epoch``;
    Keras itself only advances it at epoch ends)."""
    callback._current_epoch = epoch


def initial_epoch(model):
    """The epoch ``fit`` starts from, as a backup restore set it (the model's
    private ``_initial_epoch``), or ``None``."""
    return getattr(model, "_initial_epoch", None)


def set_initial_epoch(model, epoch):
    """Makes ``fit`` start at ``epoch``, as ``BackupAndRestore`` does when it
    restores a backup (the model's private ``_initial_epoch``)."""
    model._initial_epoch = epoch


class SaveVeto:
    """Mixin for a ``keras.callbacks.BackupAndRestore`` subclass (listed
    before it): each save goes through ``self.may_save()`` first and is
    skipped when that returns False. ``BackupAndRestore`` writes a backup in
    its private ``_save_model()``, called from its epoch- and batch-end
    hooks; overriding that method is the only way to veto a write without
    re-implementing the save schedule."""

    def may_save(self):
        return True

    def _save_model(self):
        if self.may_save():
            super()._save_model()
