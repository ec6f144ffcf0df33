"""Distribution: one name picks the strategy, and the few helpers the losses
and the masking need so that a distributed step equals a one-device step.

This is the one library module besides ``keras_lcmae.data`` that touches TensorFlow
directly (imported on first use, by :func:`keras_lcmae.backend.tf`). Names
(the recipes' ``--strategy`` flag):

- ``none``: one device (the default).
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over the local GPUs (or the
  logical CPU devices made by :func:`split_host_devices`); TensorFlow backend.
- ``multiworker``: ``tf.distribute.MultiWorkerMirroredStrategy``; the cluster
  comes from the ``TF_CONFIG`` environment variable; TensorFlow backend.
- ``tpu``: ``tf.distribute.TPUStrategy`` on the TPU named by ``tpu`` (``""`` or
  ``"local"`` for a TPU VM); TensorFlow backend.
- ``data_parallel``: ``keras.distribution.DataParallel`` over every local
  device; JAX backend. The step is one SPMD program over the global batch, so
  every loss is the global one by construction.

Under ``tf.distribute`` each replica computes its loss on its slice of the
batch. The trainer sums the replica gradients, so a loss must be divided by the
replica count (:func:`scale_loss_for_replicas`). A batch-level mean whose count
differs between replicas (L_cross: positions masked in both views) is made
exact with :func:`global_mean`, and masks are drawn per replica
(:func:`replica_uniform`) so replicas never share a mask pattern.
"""

import os

import keras

from keras_lcmae.backend import keras_internals
from keras_lcmae.backend import tf as _tf

STRATEGIES = ("none", "mirrored", "multiworker", "tpu", "data_parallel")


def split_host_devices(n):
    """Makes ``n`` logical CPU devices, to try distribution without
    accelerators. Call it before any computation (for JAX before the first
    array is made; for TensorFlow before its runtime starts)."""
    if n is None or n <= 1:
        return
    backend = keras.backend.backend()
    if backend == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()
    elif backend == "tensorflow":
        tf = _tf()
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(n))
    else:
        raise ValueError(f"host devices can be split on the tensorflow and jax backends, not {backend!r}.")


class Setup:
    """What :func:`setup` made: ``strategy`` (a ``tf.distribute`` strategy or
    None), ``num_replicas``, ``is_chief``, ``worker`` (e.g. ``"worker_1"`` for a
    non-chief multi-worker task, else None) and ``scope()`` to build the model
    in."""

    def __init__(self, name, strategy=None, num_replicas=1, is_chief=True, worker=None):
        self.name = name
        self.strategy = strategy
        self.num_replicas = num_replicas
        self.is_chief = is_chief
        self.worker = worker

    def scope(self):
        import contextlib

        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()


def _need_backend(name, backend):
    if keras.backend.backend() != backend:
        raise ValueError(
            f"strategy {name!r} needs KERAS_BACKEND={backend}; the backend is {keras.backend.backend()!r}."
        )


def setup(name="none", tpu=None):
    """Builds the distribution named ``name`` (see the module docstring).

    Raises ``ValueError`` naming the problem for an unknown name, a backend
    that cannot run it, a malformed ``TF_CONFIG`` or an unreachable TPU.

    Example:
    >>> setup("none").num_replicas
    1
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}.")
    if name == "none":
        return Setup(name)
    if name == "data_parallel":
        _need_backend(name, "jax")
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return Setup(name, num_replicas=len(devices))
    _need_backend(name, "tensorflow")
    tf = _tf()
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        return Setup(name, strategy, strategy.num_replicas_in_sync)
    if name == "multiworker":
        import json

        raw = os.environ.get("TF_CONFIG")
        if not raw:
            raise ValueError("strategy 'multiworker' reads the cluster from TF_CONFIG, which is not set.")
        try:
            config = json.loads(raw)
            task_type, task_id = config["task"]["type"], int(config["task"]["index"])
            cluster = config["cluster"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"TF_CONFIG must be JSON with 'cluster' and 'task': {{'type', 'index'}}; got {raw!r} ({e})."
            ) from None
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)
        return Setup(name, strategy, strategy.num_replicas_in_sync, chief, None if chief else f"{task_type}_{task_id}")
    # tpu
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="" if tpu in (None, "local") else tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as e:  # the resolver raises several types, none of them clear
        raise ValueError(f"could not reach the TPU {tpu!r}: {type(e).__name__}: {e}") from None
    strategy = tf.distribute.TPUStrategy(resolver)
    return Setup(name, strategy, strategy.num_replicas_in_sync)


def _replica_context():
    """The ``tf.distribute`` replica context when a step runs on several
    replicas, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    tf = _tf()
    if tf.distribute.get_strategy().num_replicas_in_sync == 1:
        return None
    return tf.distribute.get_replica_context()


def num_replicas():
    """Replicas of the current ``tf.distribute`` strategy (1 elsewhere)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    return _tf().distribute.get_strategy().num_replicas_in_sync


def scale_loss_for_replicas(loss):
    """Divides a per-replica loss by the replica count under ``tf.distribute``,
    as Keras' own ``compute_loss`` does: the TensorFlow trainer sums replica
    gradients and un-scales the reported loss. A no-op elsewhere (JAX and
    PyTorch distribution average by themselves)."""
    n = num_replicas()
    if n == 1:
        return loss
    return loss * (1.0 / n)


def global_mean(total, count):
    """``total / max(count, 1)`` for a batch-level mean whose ``count`` may
    differ between replicas.

    On one device it is the plain ratio. Under ``tf.distribute`` with ``R``
    replicas it returns ``R * total / sum_r count_r`` (the count summed over
    replicas): averaging that over the replicas, as the trainer does, gives
    exactly ``sum_r total_r / sum_r count_r``, the one-device value."""
    ctx = _replica_context()
    if ctx is None:
        return total / keras.ops.maximum(count, 1.0)
    tf = _tf()
    all_count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(count))
    return total * float(ctx.num_replicas_in_sync) / tf.maximum(all_count, 1.0)


def replica_uniform(shape, seed):
    """``keras.random.uniform(shape, seed=seed)``, different on each
    ``tf.distribute`` replica: the replicas share the seed generator's state,
    so each draws the noise of all replicas and keeps its own slice."""
    ctx = _replica_context()
    if ctx is None:
        return keras.random.uniform(shape, seed=seed)
    tf = _tf()
    r = ctx.num_replicas_in_sync
    shape = tuple(shape)
    full = keras.random.uniform((r * shape[0],) + shape[1:], seed=seed)
    full = tf.reshape(full, (r, shape[0]) + shape[1:])
    return tf.gather(full, ctx.replica_id_in_sync_group)


def _multi_worker_replica():
    """True inside a replica of a multi-worker ``tf.distribute`` step."""
    if keras.backend.backend() != "tensorflow":
        return False
    tf = _tf()
    strategy = tf.distribute.get_strategy()
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and keras_internals.in_multi_worker_mode(strategy)
        and not tf.distribute.in_cross_replica_context()
    )


def step_logs(logs):
    """The metric results a train step returns, fit for the trainer.

    Keras 3's TensorFlow trainer reduces the step's logs across workers of a
    ``MultiWorkerMirroredStrategy`` with ``strategy.reduce(MEAN, v, axis=0)``,
    which fails on scalars ("Invalid reduction dimension 0 for input with 0
    dimensions", tensorflow/tensorflow#72388). Inside such a step the scalars
    are given a length-1 axis, which that reduction averages away; everywhere
    else ``logs`` is returned unchanged."""
    if not _multi_worker_replica():
        return logs
    return {k: keras.ops.reshape(v, (1,)) if len(getattr(v, "shape", ())) == 0 else v for k, v in logs.items()}


def prepare_fit(model):
    """Makes ``model.fit`` work for data of ``(x, y)`` pairs under a
    ``MultiWorkerMirroredStrategy`` of several workers.

    Before training, Keras 3's TensorFlow trainer builds the model on the
    first batch, averaged over replicas by one ``strategy.reduce`` of the
    whole ``(x, y)`` structure. Across workers that strategy reduces single
    values only, so ``fit`` fails before its first step ("Attempt to convert
    a value (PerReplica ...) to a Tensor"); images alone (pretraining) are
    one value and pass. This reduces each value of the batch on its own, and
    gives the step's scalar metrics the axis the trainer's cross-worker
    reduction needs (:func:`step_logs`), as MAE's own ``get_metrics_result``
    does. Returns ``model``; a no-op on other strategies and backends."""
    if keras.backend.backend() != "tensorflow":
        return model
    tf = _tf()
    strategy = getattr(model, "distribute_strategy", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return model

    def reduce_each(batch):
        return tf.nest.map_structure(
            lambda v: strategy.reduce("MEAN", v, axis=None) if isinstance(v, tf.distribute.DistributedValues) else v,
            batch,
        )

    keras_internals.reduce_batch_before_build(model, reduce_each)
    metrics = model.get_metrics_result
    model.get_metrics_result = lambda: step_logs(metrics())
    return model
