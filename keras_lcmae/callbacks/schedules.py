"""Callbacks that follow the optimizer step or the epoch: the stop at a
planned step count and the switch to informed masking."""

import keras


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
        if start_epoch is not None and (
            isinstance(start_epoch, bool) or int(start_epoch) != start_epoch or start_epoch < 0
        ):
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

    def resolved_start(self):
        """The first informed epoch of this run (``None``: none planned)."""
        if self.start_epoch is not None:
            return int(self.start_epoch)
        return self.model.masking.start_epoch((self.params or {}).get("epochs"))

    def on_epoch_begin(self, epoch, logs=None):
        start = self.resolved_start()
        self._variable().assign(1.0 if start is not None and epoch >= start else 0.0)
