"""Optimisation pieces of the official MAE recipes: the warmup-cosine
schedule, AdamW with the official weight-decay exclusions, the lr scaling rule,
LARS for the linear probe and AdamW with layer-wise lr decay for finetuning."""

import math

import keras
from keras import ops

from keras_lcmae.backend.keras_internals import (  # noqa: F401  (ReleasesGradients: public here)
    AccumulatesGradients,
    KerasAdamWFastUpdate,
    LayerDecayAdamWFastUpdate,
    ReleasesGradients,
)


def scaled_lr(blr, batch_size):
    """The MAE rule ``lr = blr * batch_size / 256``."""
    return blr * batch_size / 256.0


@keras.saving.register_keras_serializable(package="keras_lcmae")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cosine
    to ``min_lr`` at ``total_steps`` (the official MAE per-iteration schedule).

    Example:
    >>> s = WarmupCosine(1e-3, warmup_steps=10, total_steps=110)
    >>> [round(float(s(step)), 6) for step in (0, 5, 10, 60, 110)]
    [0.0, 0.0005, 0.001, 0.0005, 0.0]
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


class CompilesFromConfig:
    """Mixin for a ``keras.Model`` whose ``compile()`` fills in defaults:
    loading a saved model compiles it again from its saved compile config
    (Keras skips that, with a warning, for any model with its own
    ``compile``). The optimizer is built so that its saved state (step
    count, moments) loads into it."""

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)


@keras.saving.register_keras_serializable(package="keras_lcmae")
class AdamW(KerasAdamWFastUpdate, AccumulatesGradients, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` -- the same update on every backend -- with
    a faster update on PyTorch.

    The update is Keras': the decoupled decay ``p *= 1 - lr * wd`` (skipped
    for excluded variables), then ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) *
    m / (sqrt(v) + eps)``. Keras' PyTorch AdamW computes it with five
    temporary copies of all parameters per step; on PyTorch this one runs
    PyTorch's fused or foreach kernels instead
    (:class:`~keras_lcmae.backend.keras_internals.KerasAdamWFastUpdate`;
    ``tools/benchmark.py`` measures the difference). Other backends, and
    ``amsgrad``, take Keras' own path.

    ``exclude_1d=True`` exempts every variable of rank <= 1 (biases, norm
    scales and offsets; :func:`decay_exclusions`) from the decay, besides
    those of ``exclude_from_weight_decay``. It is decided per variable when
    the update runs, so the model need not be built when the optimizer is
    made, and it is saved in the config (a ``.keras`` file reloads with it).

    Example:
    >>> opt = AdamW(1e-3, weight_decay=0.05)
    >>> isinstance(opt, keras.optimizers.AdamW)
    True
    """

    def __init__(self, *args, accum_steps=1, exclude_1d=False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_accumulation(accum_steps)
        self.exclude_1d = bool(exclude_1d)

    def decays_variable(self, variable):
        if self.exclude_1d and len(variable.shape) <= 1:
            return False
        return super().decays_variable(variable)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._build_accumulators(variables)
        # decided in Python per index: `update_step` may get TensorFlow's own variable
        self._decays = [self.weight_decay is not None and self.decays_variable(v) for v in variables]

    def _slots(self, index):
        return self.adam_slots(index)

    def _decayed_update(self, gradient, variable, learning_rate):
        """Keras' AdamW step for one variable: the decoupled decay, then Adam."""
        if self._decays[self.variable_index(variable)]:
            lr = ops.cast(learning_rate, variable.dtype)
            self.assign(variable, variable - variable * ops.cast(self.weight_decay, variable.dtype) * lr)
        super().update_step(gradient, variable, learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        if not self._masked_accumulation():
            return super().update_step(gradient, variable, learning_rate)
        self._accumulating_update(gradient, variable, learning_rate, self._decayed_update)

    def get_config(self):
        config = self._accumulation_config(super().get_config())
        config["exclude_1d"] = self.exclude_1d
        return config


def adamw(model, learning_rate, weight_decay=0.05, beta_1=0.9, beta_2=0.95, accum_steps=1):
    """AdamW (:class:`AdamW`) as the MAE pretraining recipe uses it: no
    decay on the variables of :func:`decay_exclusions` (``exclude_1d=True``,
    applied when the optimizer builds, so ``model`` need not be built yet and
    the rule survives saving); ``accum_steps`` micro-batches per update
    (:class:`AccumulatesGradients`).

    Example (the official ViT-B recipe: base lr 1.5e-4 at batch 4096, 40
    warmup epochs of 800):

    >>> from keras_lcmae import MAE, TransformerDecoder, ViTEncoder
    >>> mae = MAE(ViTEncoder.from_preset("vit_test"), TransformerDecoder(hidden_dim=32, depth=1, num_heads=2))
    >>> steps = 10                                            # optimizer updates per epoch
    >>> lr = WarmupCosine(scaled_lr(1.5e-4, 4096), warmup_steps=40 * steps, total_steps=800 * steps)
    >>> opt = adamw(mae, lr)
    >>> round(float(lr(40 * steps)), 6), opt.weight_decay, opt.beta_2
    (0.0024, 0.05, 0.95)
    >>> len(decay_exclusions(mae)), len(mae.trainable_variables)   # biases and norms are not decayed
    (31, 48)
    >>> mae.compile(optimizer=opt)
    """
    del model  # the 1-D rule is applied to whatever variables the optimizer builds for
    return AdamW(
        learning_rate, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2, accum_steps=accum_steps, exclude_1d=True
    )


# ---------------------------------------------------------------------------
# Linear probing: LARS
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_lcmae")
class LARS(AccumulatesGradients, keras.optimizers.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017), as
    the official MAE linear probe trains its head.

    For a parameter ``p`` with gradient ``g`` and at least two dimensions::

        g' = g + weight_decay * p                        (coupled L2)
        q  = trust_coefficient * |p| / |g'|   if |p| > 0 and |g'| > 0, else 1
        mu = momentum * mu + q * g'
        p  = p - learning_rate * mu

    Biases and other 1-D parameters get neither weight decay nor the trust
    ratio: ``mu = momentum * mu + g``, ``p = p - learning_rate * mu``. The
    decay is L2 added to the gradient (before the trust ratio), not Keras'
    decoupled decay; ``exclude_from_weight_decay`` removes it from more
    variables. The official probe uses ``weight_decay=0`` and
    ``learning_rate = 0.1 * batch_size / 256`` with a warmup-cosine schedule.

    Args:
        learning_rate: float or ``LearningRateSchedule``.
        weight_decay: L2 coefficient for parameters of rank >= 2.
        momentum: heavy-ball momentum (no dampening, no Nesterov).
        trust_coefficient: the ``eta`` of the trust ratio.

    Example:
    >>> import numpy as np
    >>> opt = LARS(0.1)             # the official probe: a WarmupCosine from scaled_lr(0.1, 16384)
    >>> head = keras.layers.Dense(10)
    >>> head.build((None, 32))
    >>> kernel = keras.ops.convert_to_numpy(head.kernel)
    >>> opt.apply([np.ones((32, 10), "float32"), np.ones(10, "float32")], head.trainable_weights)
    >>> change = keras.ops.convert_to_numpy(head.kernel) - kernel
    >>> round(float(np.linalg.norm(change) / np.linalg.norm(kernel)), 6)   # lr * trust_coefficient
    0.0001
    >>> [round(float(b), 6) for b in keras.ops.convert_to_numpy(head.bias)[:3]]   # 1-D: plain SGD, -lr * g
    [-0.1, -0.1, -0.1]
    """

    def __init__(
        self,
        learning_rate=0.1,
        weight_decay=0.0,
        momentum=0.9,
        trust_coefficient=0.001,
        name="lars",
        accum_steps=1,
        **kwargs,
    ):
        for arg, value in (("weight_decay", weight_decay), ("trust_coefficient", trust_coefficient)):
            if value is None or float(value) < 0:
                raise ValueError(f"`{arg}` must be a non-negative float, got {value!r}.")
        if momentum is None or not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must be a float in [0, 1), got {momentum!r}.")
        super().__init__(learning_rate=learning_rate, weight_decay=float(weight_decay), name=name, **kwargs)
        self.momentum = float(momentum)
        self.trust_coefficient = float(trust_coefficient)
        self._init_accumulation(accum_steps)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._build_accumulators(variables)
        # Decided once per variable, in Python: `update_step` may receive the
        # backend's own variable (TensorFlow), which has no Keras name or path.
        self._decays = [len(v.shape) > 1 and self.decays_variable(v) for v in variables]

    def _slots(self, index):
        return [self.momentums[index]]

    def decays_in_update(self, variables):
        return True  # coupled L2 inside `update_step`, not Keras' decoupled decay

    def update_step(self, gradient, variable, learning_rate):
        if self._masked_accumulation():
            return self._accumulating_update(gradient, variable, learning_rate, self._lars_update)
        return self._lars_update(gradient, variable, learning_rate)

    def _lars_update(self, gradient, variable, learning_rate):
        index = self.variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        if len(variable.shape) > 1:
            if self._decays[index] and self.weight_decay > 0:
                g = g + ops.cast(self.weight_decay, dtype) * variable
            p_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(g)))
            usable = ops.logical_and(p_norm > 0, g_norm > 0)
            ratio = self.trust_coefficient * p_norm / ops.where(g_norm > 0, g_norm, ops.ones_like(g_norm))
            g = g * ops.where(usable, ratio, ops.ones_like(ratio))
        mu = self.momentums[index]
        self.assign(mu, ops.cast(self.momentum, dtype) * mu + g)
        self.assign_sub(variable, lr * mu)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, trust_coefficient=self.trust_coefficient)
        return self._accumulation_config(config)


# ---------------------------------------------------------------------------
# Finetuning: layer-wise learning-rate decay
# ---------------------------------------------------------------------------


def _find_encoder(model):
    from keras_lcmae.encoder import find_encoder  # encoder imports nothing from here

    return find_encoder(model, "Layer-wise lr decay")


def layer_ids(model):
    """``{variable.path: layer_id}`` for every weight of ``model`` (a
    :class:`~keras_lcmae.ViTEncoder` or a model holding one as ``.encoder``):
    0 for the patch embedding, ``[CLS]`` token and position table, ``i + 1``
    for the weights of block ``i``, ``depth + 1`` for everything else (final
    norm, ``fc_norm``, head), as BEiT's and MAE's finetuning.

    Membership is decided by which layer object owns a variable (the encoder's
    ``patch_embed`` and ``blocks[i]``), not by parsing names, so it holds for
    any layer names; the result is keyed by ``variable.path``.
    """
    encoder = _find_encoder(model)
    owner = {id(v): 0 for v in encoder.patch_embed.weights}
    owner[id(encoder.cls_token)] = 0
    owner[id(encoder.pos_embed)] = 0
    for i, block in enumerate(encoder.blocks):
        owner.update({id(v): i + 1 for v in block.weights})
    ids = {}
    for v in model.weights:
        layer_id = owner.get(id(v), encoder.depth + 1)
        if ids.get(v.path, layer_id) != layer_id:
            raise ValueError(
                f"Two variables share the path {v.path!r} but sit at different depths; give the "
                f"layers distinct names so that per-variable learning rates can be keyed by path."
            )
        ids[v.path] = layer_id
    return ids


def layer_decay_multipliers(model_or_encoder, layer_decay):
    """Per-variable learning-rate multipliers of layer-wise lr decay:
    ``layer_decay ** (depth + 1 - layer_id)`` with the layer ids of
    :func:`layer_ids` (1 for the head and final norms, ``layer_decay`` for the
    last block, ``layer_decay ** (depth + 1)`` for the patch embedding).

    Example:
    >>> from keras_lcmae import ViTEncoder
    >>> encoder = ViTEncoder.from_preset("vit_test")          # depth 2
    >>> m = layer_decay_multipliers(encoder, 0.5)
    >>> m["vit_encoder/cls_token"], m["vit_encoder/blocks_1/fc1/kernel"], m["vit_encoder/norm/gamma"]
    (0.125, 0.5, 1.0)
    """
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        raise ValueError(
            f"`layer_decay` must be a float in (0, 1] (0.75 official default, 0.65 for ViT-B), got {layer_decay!r}."
        )
    depth = _find_encoder(model_or_encoder).depth
    return {path: float(layer_decay) ** (depth + 1 - i) for path, i in layer_ids(model_or_encoder).items()}


@keras.saving.register_keras_serializable(package="keras_lcmae")
class LayerDecayAdamW(LayerDecayAdamWFastUpdate, AccumulatesGradients, keras.optimizers.Optimizer):
    """AdamW with a per-variable learning-rate multiplier, as the official
    finetuning's parameter groups (layer-wise lr decay).

    For a variable with multiplier ``s`` (from ``lr_multipliers``, keyed by
    ``variable.path``; 1 when ``None``) and ``lr_s = s * learning_rate``::

        p = p - lr_s * weight_decay * p                  (decoupled decay)
        m = beta_1 m + (1 - beta_1) g,  v = beta_2 v + (1 - beta_2) g^2
        p = p - lr_s * (m / (1 - beta_1^t)) / (sqrt(v / (1 - beta_2^t)) + epsilon)

    which is ``torch.optim.AdamW`` (epsilon outside the bias-corrected square
    root) applied to a param group whose lr is ``lr_s``: the decay is scaled
    by the multiplier too. Parameters of rank <= 1 (biases, norms) and the
    paths in ``no_weight_decay`` are not decayed. The update is written with
    ``keras.ops`` in ``update_step`` and runs so on every backend, except on
    PyTorch CPU tensors: there it is exactly ``torch.optim.AdamW``'s fused
    kernel, called once per (lr multiplier, decay) group
    (:class:`~keras_lcmae.backend.keras_internals.LayerDecayAdamWFastUpdate`).

    Args:
        learning_rate: float or ``LearningRateSchedule`` (the lr of the head).
        weight_decay: decoupled decay coefficient.
        beta_1, beta_2, epsilon: Adam constants (torch defaults).
        lr_multipliers: ``{variable.path: multiplier}``, e.g. from
            :func:`layer_decay_multipliers`. Every trained variable must have an
            entry (a ``ValueError`` names those without one).
        no_weight_decay: variable paths excluded from decay besides the 1-D ones.

    Example:
    >>> from keras_lcmae import ViTClassifier, ViTEncoder
    >>> model = ViTClassifier(ViTEncoder.from_preset("vit_test"), num_classes=10)
    >>> opt = LayerDecayAdamW(1e-3, weight_decay=0.05,
    ...                       lr_multipliers=layer_decay_multipliers(model, 0.75))
    >>> sorted(set(opt.lr_multipliers.values()))       # patch embedding, block 0, block 1, head
    [0.421875, 0.5625, 0.75, 1.0]
    >>> model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    :func:`finetune_adamw` builds this with the official settings.
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.05,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        lr_multipliers=None,
        no_weight_decay=None,
        name="layer_decay_adamw",
        accum_steps=1,
        **kwargs,
    ):
        if weight_decay is None or float(weight_decay) < 0:
            raise ValueError(f"`weight_decay` must be a non-negative float, got {weight_decay!r}.")
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"`{arg}` must be in [0, 1), got {value!r}.")
        if lr_multipliers is not None and not hasattr(lr_multipliers, "items"):
            raise ValueError(
                f"`lr_multipliers` must map variable paths to floats (see layer_decay_multipliers), got "
                f"{type(lr_multipliers).__name__}."
            )
        if isinstance(no_weight_decay, str):
            raise ValueError("`no_weight_decay` must be a list of variable paths, not a single string.")
        super().__init__(learning_rate=learning_rate, weight_decay=float(weight_decay), name=name, **kwargs)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.lr_multipliers = None if lr_multipliers is None else {str(k): float(v) for k, v in lr_multipliers.items()}
        self.no_weight_decay = sorted(no_weight_decay or [])
        self._init_accumulation(accum_steps)

    def build(self, variables):
        if self.built:
            return
        if self.lr_multipliers is not None:
            missing = [v.path for v in variables if v.path not in self.lr_multipliers]
            if missing:
                raise ValueError(
                    f"No learning-rate multiplier for {missing}: compute `lr_multipliers` with "
                    f"layer_decay_multipliers(model, layer_decay) on the model this optimizer trains."
                )
        super().build(variables)
        self.momentums, self.velocities = self.add_optimizer_variables(variables, ["momentum", "velocity"])
        self._build_accumulators(variables)
        # Per-index Python constants: `update_step` may receive the backend's
        # own variable (TensorFlow), which has no Keras path.
        self._scales = [1.0 if self.lr_multipliers is None else self.lr_multipliers[v.path] for v in variables]
        excluded = set(self.no_weight_decay)
        self._decays = [len(v.shape) > 1 and v.path not in excluded and self.decays_variable(v) for v in variables]

    def decays_in_update(self, variables):
        return True  # per variable, scaled, inside the update

    def _slots(self, index):
        return [self.momentums[index], self.velocities[index]]

    def update_step(self, gradient, variable, learning_rate):
        if self._masked_accumulation():
            return self._accumulating_update(gradient, variable, learning_rate, self._adamw_update)
        return self._adamw_update(gradient, variable, learning_rate)

    def _adamw_update(self, gradient, variable, learning_rate):
        index = self.variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype) * self._scales[index]
        g = ops.cast(gradient, dtype)
        if self._decays[index] and self.weight_decay > 0:
            self.assign_sub(variable, lr * ops.cast(self.weight_decay, dtype) * variable)
        step = ops.cast(self.iterations + 1, dtype)
        correction_1 = 1.0 - ops.power(ops.cast(self.beta_1, dtype), step)
        correction_2 = 1.0 - ops.power(ops.cast(self.beta_2, dtype), step)
        m = self.momentums[index]
        v = self.velocities[index]
        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * g)
        self.assign(v, self.beta_2 * v + (1.0 - self.beta_2) * ops.square(g))
        denom = ops.sqrt(v / correction_2) + self.epsilon
        self.assign_sub(variable, lr * (m / correction_1) / denom)

    def get_config(self):
        config = super().get_config()
        config.update(
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            lr_multipliers=self.lr_multipliers,
            no_weight_decay=self.no_weight_decay,
        )
        return self._accumulation_config(config)


def finetune_adamw(model, learning_rate, weight_decay=0.05, layer_decay=0.75, beta_1=0.9, beta_2=0.999, **kwargs):
    """The official MAE finetuning optimizer for ``model`` (a
    :class:`~keras_lcmae.ViTClassifier` or anything holding a ViTEncoder as
    ``.encoder``): :class:`LayerDecayAdamW` with
    :func:`layer_decay_multipliers` and, as the official ``no_weight_decay``
    list, no decay on 1-D parameters, the ``[CLS]`` token and the position
    table. Defaults are the official script's (layer decay 0.75; its ViT-B
    recipe uses 0.65). Extra keyword arguments go to the optimizer.

    Example:
    >>> from keras_lcmae import ViTClassifier, ViTEncoder
    >>> model = ViTClassifier(ViTEncoder.from_preset("vit_test"), num_classes=10, pool="avg")
    >>> opt = finetune_adamw(model, WarmupCosine(scaled_lr(5e-4, 1024), 5, 100), layer_decay=0.65)
    >>> [round(m, 6) for m in sorted(set(opt.lr_multipliers.values()))]
    [0.274625, 0.4225, 0.65, 1.0]
    >>> opt.no_weight_decay                 # besides every 1-D parameter
    ['vit_encoder/cls_token', 'vit_encoder/pos_embed']
    """
    encoder = _find_encoder(model)
    return LayerDecayAdamW(
        learning_rate,
        weight_decay=weight_decay,
        beta_1=beta_1,
        beta_2=beta_2,
        lr_multipliers=layer_decay_multipliers(model, layer_decay),
        no_weight_decay=[encoder.cls_token.path, encoder.pos_embed.path],
        **kwargs,
    )
