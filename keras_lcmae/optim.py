"""Optimisation pieces of the official MAE recipes: the warmup-cosine
schedule, AdamW with the official weight-decay exclusions, the lr scaling rule."""

import math

import keras


def scaled_lr(blr, batch_size):
    """The MAE rule ``lr = blr * batch_size / 256``."""
    return blr * batch_size / 256.0


@keras.saving.register_keras_serializable(package="keras_lcmae")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cosine
    to ``min_lr`` at ``total_steps`` (the official MAE per-iteration schedule).

    Example:
    >>> s = WarmupCosine(1e-3, warmup_steps=10, total_steps=110)
    >>> float(s(5)), float(s(10)), round(float(s(110)), 8)
    (0.0005, 0.001, 0.0)
    """

    def __init__(self, peak, warmup_steps, total_steps, min_lr=0.0):
        if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got warmup_steps={warmup_steps}, "
                f"total_steps={total_steps}."
            )
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)

    def __call__(self, step):
        from keras import ops

        step = ops.cast(step, "float32")
        warm = self.peak * step / max(self.warmup_steps, 1)
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        progress = ops.clip(progress, 0.0, 1.0)
        cosine = self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return dict(peak=self.peak, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_lr=self.min_lr)


def decay_exclusions(model):
    """Variables the official recipes do not decay: every 1-D parameter
    (biases, LayerNorm scales and offsets). The ``[CLS]`` and mask tokens and
    all kernels are decayed; the projector's kernel is decayed, its bias not."""
    return [v for v in model.trainable_variables if len(v.shape) <= 1]


def adamw(model, learning_rate, weight_decay=0.05, beta_1=0.9, beta_2=0.95):
    """AdamW as the MAE pretraining recipe uses it, with the exclusions of
    :func:`decay_exclusions` registered on the optimizer."""
    opt = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2)
    opt.exclude_from_weight_decay(var_list=decay_exclusions(model))
    return opt
