"""Shared test helpers: numpy conversion, serialization round trips, gradients,
the HParams a recipe run writes."""

import inspect
import os

import keras
import numpy as np


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def assert_config_mirrors_init(obj):
    """``get_config`` holds exactly the ``__init__`` arguments (plus Keras' own
    base entries), and ``from_config`` rebuilds an object with the same config."""
    config = obj.get_config()
    params = {
        name
        for name, p in inspect.signature(type(obj).__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    base = {"name", "trainable", "dtype"}
    assert params <= set(config), f"missing from get_config: {params - set(config)}"
    assert set(config) - base <= params, f"not __init__ arguments: {set(config) - base - params}"
    clone = type(obj).from_config(config)
    assert _normalise(clone.get_config()) == _normalise(config)
    return clone


def _normalise(config):
    if isinstance(config, dict):
        return {k: _normalise(v) for k, v in config.items() if k != "build_config"}
    if isinstance(config, (list, tuple)):
        return [_normalise(v) for v in config]
    return config


def gradients(model, loss_fn):
    """Gradients of ``loss_fn()`` w.r.t. ``model.trainable_variables`` on the
    current backend, as numpy arrays."""
    backend = keras.backend.backend()
    variables = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, [v.value for v in variables])
        return [None if g is None else np.asarray(g) for g in grads]
    if backend == "torch":
        for v in variables:
            v.value.grad = None
        loss = loss_fn()
        loss.backward()
        return [None if v.value.grad is None else keras.ops.convert_to_numpy(v.value.grad.detach()) for v in variables]
    if backend == "jax":
        import jax

        originals = [v.value for v in variables]

        def f(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loss_fn()

        grads = jax.grad(f)(originals)
        return [np.asarray(g) for g in grads]
    raise NotImplementedError(backend)


def assert_all_gradients(model, loss_fn, allow_zero=()):
    """Every trainable weight receives a finite, non-zero gradient (as timm's
    ``test_model_backward``)."""
    grads = gradients(model, loss_fn)
    for v, g in zip(model.trainable_variables, grads):
        assert g is not None, f"no gradient for {v.path}"
        assert np.all(np.isfinite(g)), f"non-finite gradient for {v.path}"
        if not any(tag in v.path for tag in allow_zero):
            assert np.abs(g).max() > 0, f"zero gradient for {v.path}"


def read_hparams(folder):
    """What TensorBoard's HParams dashboard reads of a recipe run's
    ``tensorboard/`` folder (its session; sub-folders are other runs):
    ``(hparams, scalars, starts)``, the session start's hparams (name ->
    value), the scalars (tag -> last value) and how many session starts
    were written. Fails if an experiment config was written (TensorBoard
    infers it from all sessions; see ``recipes/common.py``'s
    ``log_hparams``)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    hparams, scalars, starts = {}, {}, 0
    for name in sorted(os.listdir(folder)):
        if "tfevents" not in name:
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data
                if plugin.plugin_name == metadata.PLUGIN_NAME:
                    data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
                    assert not data.HasField("experiment"), "an experiment config hides other runs' columns"
                    if data.HasField("session_start_info"):
                        starts += 1
                        for key, v in data.session_start_info.hparams.items():
                            hparams[key] = getattr(v, v.WhichOneof("kind"))
                else:
                    scalars[value.tag] = float(tf.make_ndarray(value.tensor))
    return hparams, scalars, starts


def check_layer(layer_factory, input_shape, tmp_path, seed=0):
    """The common checks of a layer (or a model used as one), each failing
    with the name of what broke:

    - called on a ``keras.Input`` (symbolic), its output shape is the eager
      call's, the batch axis left open;
    - wrapped in a functional model, one ``fit`` step on random data gives a
      finite loss and changes some trainable weight (when it has any);
    - that model saved as ``.keras`` in ``tmp_path`` reloads and computes
      the same outputs, bit for bit;
    - ``get_config`` holds exactly the ``__init__`` parameters (plus Keras'
      base keys) and ``from_config`` rebuilds it
      (:func:`assert_config_mirrors_init`).

    ``layer_factory()`` makes a fresh layer; ``input_shape`` includes the
    batch axis. Returns the trained model."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=input_shape).astype("float32")
    layer = layer_factory()
    inputs = keras.Input(input_shape[1:])
    symbolic = layer(inputs)
    eager = to_np(layer(x))
    assert tuple(symbolic.shape) == (None, *eager.shape[1:]), f"symbolic {symbolic.shape} != eager {eager.shape}"
    assert np.all(np.isfinite(eager)), "eager call gives non-finite values"

    model = keras.Model(inputs, symbolic)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [to_np(v).copy() for v in model.trainable_variables]
    y = rng.normal(size=eager.shape).astype("float32")
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]), f"fit step loss {history.history['loss'][0]}"
    if before:
        changed = [not np.array_equal(b, to_np(v)) for b, v in zip(before, model.trainable_variables)]
        assert any(changed), "no trainable weight changed in a fit step"

    path = os.path.join(str(tmp_path), f"{layer.name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_np(loaded(x)), to_np(model(x)), err_msg="outputs after a .keras round trip")

    assert_config_mirrors_init(layer)
    return model
