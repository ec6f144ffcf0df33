"""Mixins that override Keras' private hooks, and the few other private
Keras and TensorFlow APIs the library needs, so that the rest of it uses
public APIs only.

Optimizers (:mod:`keras_lcmae.optim` mixes these in):

- :class:`OptimizerInternals`: named access to a Keras optimizer's variable
  index and weight-decay rule (``_get_variable_index``,
  ``_use_weight_decay``), and the decay hook (``_apply_weight_decay``).
- :class:`AccumulatesGradients`: gradient accumulation (``_iterations``,
  ``_get_current_learning_rate``, ``_backend_apply_gradients``).
- :class:`KerasAdamWFastUpdate` and :class:`LayerDecayAdamWFastUpdate`: the
  PyTorch fused/foreach updates (``_backend_update_step``).

Models and training: :class:`ReleasesGradients` (PyTorch frees gradients
before the forward pass), :class:`SaveHook` (``ModelCheckpoint._save_model``),
:func:`in_multi_worker_mode` and :func:`reduce_batch_before_build` (Keras'
multi-worker ``fit``).
"""

import math

import keras
from keras import ops

from keras_lcmae.backend import torch_optim, use_fast_paths

# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


def _value(variable):
    """The current value of a Keras variable (inside JAX's stateless scope
    too), or the backend variable itself (TensorFlow may pass its own)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


class OptimizerInternals:
    """Mixin for a ``keras.optimizers.Optimizer``: public names for the
    private pieces a custom update needs.

    ``variable_index(v)`` is the index of ``v`` (a Keras variable, or the
    backend's own variable that TensorFlow passes to ``update_step``) in the
    built optimizer's lists. ``decays_variable(v)`` is the weight-decay rule
    (Keras': not in ``exclude_from_weight_decay``); subclasses extend it,
    and Keras' decoupled decay follows it. ``decays_in_update(variables)``
    says that the update itself applies the decay, so Keras' decoupled
    decay before the update is skipped (default: False).
    """

    def variable_index(self, variable):
        return self._get_variable_index(variable)

    def decays_variable(self, variable):
        return super()._use_weight_decay(variable)

    def _use_weight_decay(self, variable):
        return self.decays_variable(variable)

    def decays_in_update(self, variables):
        return False

    def _apply_weight_decay(self, variables):
        if not self.decays_in_update(variables):
            super()._apply_weight_decay(variables)


class AccumulatesGradients(OptimizerInternals):
    """Gradient accumulation for the project's optimizers: ``accum_steps=K``
    micro-batches make one update, as official MAE's ``--accum_iter``.

    Each micro-batch's gradient (of its own mean loss) is added to an
    accumulator; every K-th micro-batch the optimizer updates with the mean of
    the K gradients, ``(g_1 + ... + g_K) / K`` (official MAE divides each
    micro-batch's loss by K, which is the same), and empties the accumulator.
    So for a loss that is a plain mean over images, K micro-batches of ``b``
    give the update of one batch of ``K * b``.

    ``iterations`` counts **updates** (``floor(micro_steps / K)``); the
    learning-rate schedule, Adam's bias correction and the weight decay read
    it, so a schedule written in updates is followed exactly. The micro-batch
    count stays in the ``_iterations`` variable, which backups save with the
    accumulators, so a run resumed mid-cycle continues it.

    How: a compiled step (TensorFlow, JAX) cannot branch on the count without
    breaking ``tf.distribute``'s cross-replica update, so each variable's
    update is computed on every micro-batch from the accumulated gradient and
    kept only on the K-th (``where``); the others leave the variable and its
    slots as they were. Under ``tf.distribute`` the gradient reaching
    ``update_step`` is already summed over replicas, so the accumulator holds
    the global gradient on every replica. Speed path: on PyTorch (eager) a
    micro-batch that is not the K-th only adds to the accumulator.

    A subclass calls ``_init_accumulation`` in ``__init__`` and
    ``_build_accumulators`` in ``build``, defines ``_slots(index)``, runs its
    per-variable update through ``_accumulating_update`` when
    ``_masked_accumulation()``, and saves ``_accumulation_config``.
    """

    def _init_accumulation(self, accum_steps):
        if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"`accum_steps` must be an integer >= 1 (micro-batches per update), got {accum_steps!r}.")
        if accum_steps > 1 and (self.clipnorm or self.global_clipnorm or self.clipvalue or self.use_ema):
            raise ValueError(
                "`accum_steps` > 1 does not combine with gradient clipping or EMA here (they would act on each "
                "micro-batch instead of the accumulated gradient)."
            )
        if accum_steps > 1 and self.gradient_accumulation_steps:
            raise ValueError("Give `accum_steps` or Keras' `gradient_accumulation_steps`, not both.")
        self.accum_steps = int(accum_steps)

    @property
    def iterations(self):
        """Optimizer updates made (micro-batches // ``accum_steps``)."""
        k = getattr(self, "accum_steps", 1)
        if k > 1:
            return ops.floor_divide(self._iterations, k)
        return super().iterations

    def _get_current_learning_rate(self):
        # Keras passes the micro-batch count to a schedule; the schedule here is in updates.
        if getattr(self, "accum_steps", 1) > 1 and isinstance(
            self._learning_rate, keras.optimizers.schedules.LearningRateSchedule
        ):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    def _build_accumulators(self, variables):
        self._accumulators = self.add_optimizer_variables(variables, "accumulator") if self.accum_steps > 1 else []

    def _slots(self, index):
        """The optimizer variables an update of variable ``index`` writes."""
        raise NotImplementedError

    def _masked_accumulation(self):
        return self.accum_steps > 1 and not torch_optim.is_torch()

    def _backend_apply_gradients(self, grads, trainable_variables):
        if self.accum_steps == 1 or not torch_optim.is_torch():
            return super()._backend_apply_gradients(grads, trainable_variables)
        import torch

        accumulators = [self._accumulators[self.variable_index(v)].value for v in trainable_variables]
        micro = int(ops.convert_to_numpy(self._iterations))
        if (micro + 1) % self.accum_steps:
            torch_optim.accumulate(accumulators, grads)
            return None
        with torch.no_grad():
            grads = [(a + torch_optim.as_torch_like(g, a)) / self.accum_steps for a, g in zip(accumulators, grads)]
            for a in accumulators:
                a.zero_()
        return super()._backend_apply_gradients(grads, trainable_variables)

    def _accumulating_update(self, gradient, variable, learning_rate, update):
        """Runs ``update(gradient, variable, learning_rate)`` (which writes
        ``variable`` and its slots) with the accumulated mean gradient, and
        keeps what it wrote only on every ``accum_steps``-th micro-batch."""
        index = self.variable_index(variable)
        accumulator = self._accumulators[index]
        total = _value(accumulator) + ops.cast(gradient, accumulator.dtype)
        is_update = ops.equal(ops.mod(self._iterations + 1, self.accum_steps), 0)
        state = [variable, *self._slots(index)]
        before = [ops.copy(_value(s)) for s in state]
        update(total / self.accum_steps, variable, learning_rate)
        for s, old in zip(state, before):
            self.assign(s, ops.where(is_update, _value(s), old))
        self.assign(accumulator, ops.where(is_update, ops.zeros_like(total), total))

    def _accumulation_config(self, config):
        config["accum_steps"] = self.accum_steps
        return config


class KerasAdamWFastUpdate:
    """Mixin for a subclass of ``keras.optimizers.AdamW`` (before it, after
    :class:`AccumulatesGradients`): Keras' AdamW update computed by
    PyTorch's kernels on the PyTorch backend.

    On a PyTorch CPU tensor it is PyTorch's fused AdamW kernel (one pass over
    ``p, g, m, v``; decay included) with ``eps / sqrt(1 - b2^t)`` in place
    of ``eps``, which is the same formula; on other PyTorch devices, in-place
    foreach operations with one temporary (after Keras' decoupled decay).
    Other backends, ``amsgrad`` and the speed paths off take Keras' own path.
    ``adam_slots(index)`` names Keras' slot variables of variable ``index``.
    """

    def adam_slots(self, index):
        slots = [self._momentums[index], self._velocities[index]]
        return slots + ([self._velocity_hats[index]] if self.amsgrad else [])

    def _torch_fused(self, variables):
        return not self.amsgrad and torch_optim.fused_adamw_usable(variables)

    def decays_in_update(self, variables):
        # the fused kernel, or the accumulating update_step, applies the same decay
        return self._torch_fused(variables) or self._masked_accumulation()

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not torch_optim.is_torch() or self.amsgrad:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        index = [self.variable_index(v) for v in trainable_variables]
        momentums = [self._momentums[i] for i in index]
        velocities = [self._velocities[i] for i in index]
        if self._torch_fused(trainable_variables):
            # host scalars are free on the CPU
            t = float(ops.convert_to_numpy(self.iterations)) + 1.0
            lr = float(ops.convert_to_numpy(learning_rate))
            groups = {}
            for i, v in enumerate(trainable_variables):
                wd = self.weight_decay if self.weight_decay is not None and self.decays_variable(v) else 0.0
                groups.setdefault((lr, float(wd)), []).append(i)
            eps = self.epsilon / math.sqrt(1.0 - self.beta_2**t)
            torch_optim.fused_adamw_groups(
                trainable_variables, grads, momentums, velocities, groups, t, self.beta_1, self.beta_2, eps
            )
            return None
        torch_optim.foreach_keras_adam(
            trainable_variables,
            grads,
            momentums,
            velocities,
            learning_rate,
            self.iterations + 1,
            self.beta_1,
            self.beta_2,
            self.epsilon,
        )
        return None


class LayerDecayAdamWFastUpdate:
    """Mixin for :class:`keras_lcmae.optim.LayerDecayAdamW`: on a PyTorch
    CPU tensor its update is ``torch.optim.AdamW``'s per param group, so
    PyTorch's fused kernel runs once per (lr scale, decay) group; elsewhere,
    or with the speed paths off, Keras' per-variable loop over
    ``update_step``. Reads the optimizer's ``momentums``, ``velocities``,
    ``_scales`` and ``_decays`` (per variable index)."""

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not torch_optim.fused_adamw_usable(trainable_variables):
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        t = float(ops.convert_to_numpy(self.iterations)) + 1.0
        lr = float(ops.convert_to_numpy(learning_rate))
        index = [self.variable_index(v) for v in trainable_variables]
        groups = {}
        for i, k in enumerate(index):
            wd = self.weight_decay if self._decays[k] else 0.0
            groups.setdefault((lr * self._scales[k], float(wd)), []).append(i)
        torch_optim.fused_adamw_groups(
            trainable_variables,
            grads,
            [self.momentums[k] for k in index],
            [self.velocities[k] for k in index],
            groups,
            t,
            self.beta_1,
            self.beta_2,
            self.epsilon,
        )
        return None


# ---------------------------------------------------------------------------
# Models, callbacks, distribution
# ---------------------------------------------------------------------------


class ReleasesGradients:
    """Mixin for a ``keras.Model``: on PyTorch, each training step first frees
    the previous step's gradients (``.grad = None``).

    Keras' PyTorch ``train_step`` clears them only after the forward pass, so
    they sit in memory next to that step's activations and raise the peak by
    up to the size of the trainable weights (``docs/benchmarks.md``). The
    gradients are never needed after the optimizer's update, and Keras' own
    clearing then finds nothing to clear. Other backends keep no gradients
    between steps; nothing changes there, nor with the speed paths off.
    """

    def train_step(self, *args, **kwargs):
        if use_fast_paths() and keras.backend.backend() == "torch":
            self.zero_grad(set_to_none=True)
        return super().train_step(*args, **kwargs)


class SaveHook:
    """Mixin for a ``keras.callbacks.ModelCheckpoint``: calls
    ``after_save(epoch, best_before)`` after each of Keras' save decisions
    (``best_before``: the best monitored value before it), so a subclass can
    act on a new best model."""

    def _save_model(self, epoch, batch, logs):
        before = self.best
        super()._save_model(epoch, batch, logs)
        self.after_save(epoch, before)

    def after_save(self, epoch, best_before):
        """Called after each save decision; does nothing by default."""


def in_multi_worker_mode(strategy):
    """Whether a ``tf.distribute.MultiWorkerMirroredStrategy`` spans several
    workers (TensorFlow's own test, a private one)."""
    return strategy.extended._in_multi_worker_mode()


def reduce_batch_before_build(model, reduce):
    """Makes Keras' TensorFlow trainer build ``model`` on ``reduce(batch)``
    instead of its own cross-replica reduction of the first batch (its
    private ``_maybe_symbolic_build`` hook). ``reduce`` maps a per-replica
    batch structure to the values to build on."""
    build = model._maybe_symbolic_build

    def reduce_then_build(iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            for _, _, it in iterator:
                data_batch = reduce(next(it))
                break
        return build(data_batch=data_batch)

    model._maybe_symbolic_build = reduce_then_build
