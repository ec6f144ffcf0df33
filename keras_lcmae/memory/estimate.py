"""The estimate: bytes of weights, gradients, optimizer state and
accumulators, and the activations of each part of the model (the formula of
the :mod:`keras_lcmae.memory` docstring)."""

import dataclasses

import keras

from keras_lcmae.cpu import backend_on_cpu
from keras_lcmae.memory.geometry import Geometry, count_params, model_geometry

ESTIMATE_KEYS = ("parameters", "gradients", "optimizer_state", "accumulators", "activations", "total")

# Optimizer state per trainable weight, in copies of it, by (lower-case)
# optimizer class or name.
OPTIMIZER_SLOTS = {
    "adamw": 2,
    "adam": 2,
    "layerdecayadamw": 2,
    "layer_decay_adamw": 2,
    "lamb": 2,
    "nadam": 2,
    "adamax": 2,
    "lars": 1,
    "momentum": 1,
    "rmsprop": 1,
    "adagrad": 1,
    "lion": 1,
    "sgd": 0,
}


def dtype_bytes(dtype):
    """Bytes per element of a compute dtype: an int (returned as is), a dtype
    name (``"float32"``, ``"bfloat16"``, ``"float16"``), a policy name
    (``"mixed_bfloat16"``: its compute dtype) or a ``keras.DTypePolicy``."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in (2, 4, 8):
            raise ValueError(f"compute dtype bytes must be 2, 4 or 8, got {dtype}.")
        return dtype
    name = getattr(dtype, "compute_dtype", None) or getattr(dtype, "name", None) or str(dtype)
    name = str(name).replace("mixed_", "").replace("torch.", "")
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "bf16": 2, "fp16": 2, "none": 4}
    if name not in sizes:
        raise ValueError(f"Unknown compute dtype {dtype!r}; use float32, bfloat16, float16 or a dtype policy.")
    return sizes[name]


def optimizer_slots(optimizer):
    """Copies of the trainable weights an optimizer keeps: an int (as is), a
    name (``"adamw"`` 2, ``"lars"`` 1, ``"sgd"`` 0, see
    :data:`OPTIMIZER_SLOTS`) or an optimizer instance (by its class; Adam
    with ``amsgrad`` 3, SGD with momentum 1)."""
    if isinstance(optimizer, int) and not isinstance(optimizer, bool):
        if optimizer < 0:
            raise ValueError(f"optimizer slots must be >= 0, got {optimizer}.")
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in OPTIMIZER_SLOTS:
            raise ValueError(f"Unknown optimizer {optimizer!r}; give its slot count (AdamW 2, LARS 1, SGD 0).")
        return OPTIMIZER_SLOTS[key]
    name = type(optimizer).__name__.lower()
    if name == "sgd":
        return 1 if float(getattr(optimizer, "momentum", 0.0) or 0.0) > 0 else 0
    for cls in type(optimizer).__mro__:
        key = cls.__name__.lower()
        if key in OPTIMIZER_SLOTS:
            return OPTIMIZER_SLOTS[key] + (1 if getattr(optimizer, "amsgrad", False) else 0)
    raise ValueError(f"Unknown optimizer {type(optimizer).__name__}; pass its slot count as optimizer=N.")


def optimizer_accum_steps(optimizer):
    """The gradient-accumulation steps an optimizer instance is set for: its
    ``accum_steps`` (this package's optimizers) or Keras'
    ``gradient_accumulation_steps``; 1 when neither is set."""
    for attr in ("accum_steps", "gradient_accumulation_steps"):
        value = getattr(optimizer, attr, None)
        if value:
            return int(value)
    return 1


def attention_constant(attention="auto", backend=None, compute_bytes=4, on_cpu=None):
    """``c``, the attention-matrix elements a block keeps per ``(row, head,
    query, key)`` (:mod:`keras_lcmae.memory` docstring): ``"fused"`` 0, ``"explicit"`` 1 on
    PyTorch and 2 on JAX and TensorFlow, a number as is, or ``"auto"``: what
    the backend runs (PyTorch: fused, but explicit for 16-bit on the CPU as
    :func:`keras_lcmae.layers.fused_attention_is_fast`; JAX and TensorFlow:
    explicit)."""
    if isinstance(attention, (int, float)) and not isinstance(attention, bool):
        if attention < 0:
            raise ValueError(f"attention constant must be >= 0, got {attention}.")
        return attention
    backend = _backend(backend)
    if attention == "fused":
        return 0
    if attention == "explicit":
        return 1 if backend == "torch" else 2
    if attention != "auto":
        raise ValueError(f"attention must be 'auto', 'fused', 'explicit' or a number, got {attention!r}.")
    if backend == "torch":
        if compute_bytes >= 4:
            return 0
        if on_cpu is None:
            on_cpu = backend_on_cpu()
        return 1 if on_cpu else 0
    return 2


def _backend(backend):
    if backend is None:
        backend = keras.backend.backend()
    if backend not in BLOCK_CONSTANTS:
        raise ValueError(f"backend must be one of {sorted(BLOCK_CONSTANTS)}, got {backend!r}.")
    return backend


def block_constants(backend, mlp_ratio=4.0):
    """``(a_s, a_l, a_0)`` of :func:`block_activation_bytes` for a backend:
    per token, ``a_s`` tensors ``D`` wide in the compute dtype, ``a_l`` in
    LayerNorm's (at least float32) and ``a_0`` bytes of statistics (:mod:`keras_lcmae.memory`
    docstring, where each is accounted for)."""
    ln, mlp, stats = BLOCK_CONSTANTS[_backend(backend)]
    return (7 if ln == 2 else 6) + mlp * mlp_ratio, ln, stats


# per backend: D-wide LayerNorm tensors (float32), MLP-hidden tensors per
# (m D), bytes of statistics per token; the attention and norm outputs, the
# 5 (PyTorch) or 4 (XLA) D-wide tensors, are in block_constants
BLOCK_CONSTANTS = {"torch": (2, 2, 16), "jax": (6, 4, 32), "tensorflow": (6, 4, 32)}


def block_activation_bytes(batch, tokens, width, heads, mlp_ratio=4.0, compute_bytes=4, attention=0, backend="torch"):
    """Bytes one pre-norm Transformer block keeps for its backward pass:
    ``B·T·(a_s·D·s + a_l·D·l + a_0 + 4·h·f) + B·h·T²·c·s`` (:mod:`keras_lcmae.memory`
    docstring; ``l = max(s, 4)``; ``f = 1`` for PyTorch's fused attention,
    ``c = 0``, with its log-sum-exp)."""
    s, c = compute_bytes, attention
    a_s, a_l, a_0 = block_constants(backend, mlp_ratio)
    lse = 4 * heads if (c == 0 and backend == "torch") else 0
    per_token = a_s * width * s + a_l * width * max(s, 4) + a_0 + lse
    return int(batch * tokens * per_token + batch * heads * tokens * tokens * c * s)


def inference_block_bytes(batch, tokens, width, heads, mlp_ratio=4.0, compute_bytes=4, attention=0, backend="torch"):
    """The working set of one block run in inference (nothing kept for a
    backward; the linear probe's frozen encoder). PyTorch runs op by op:
    ``B·T·(4 + 2m)·D·s``, the residual input, the normed input and the MLP
    hidden before and after its bias and GELU (``2m·D``) live at once at the
    ``fc1`` bias addition, 2 more for the allocator's rounding and the
    patchified input (measured 12.3 ``D`` at ``m = 4``), plus on the explicit
    path the logits and probabilities ``2·B·h·T²·s``. XLA (JAX, TensorFlow)
    fuses the bias and GELU into the matmul and reuses buffers:
    ``B·T·(1 + 2m)·D·s + B·h·T²·s`` (measured 16.8 MiB on JAX and 13.6 MiB on
    TensorFlow against 15.4 MiB for the test's probe)."""
    s = compute_bytes
    if _backend(backend) == "torch":
        square = 2 * batch * heads * tokens * tokens * s if attention else 0
        return int(batch * tokens * (4 + 2 * mlp_ratio) * width * s + square)
    return int(batch * tokens * (1 + 2 * mlp_ratio) * width * s + batch * heads * tokens * tokens * s)


def _norm_bytes(rows, tokens, width, s):
    """A LayerNorm's saved input (float32 at least), output and statistics."""
    return rows * tokens * (width * (max(s, 4) + s) + 8)


def activation_breakdown(geometry, batch_size, compute_bytes=4, attention=0, backend="torch"):
    """The activation bytes of :func:`estimate_training_memory`, by part
    (``patch_embed``, ``encoder_blocks``, ``encoder_norm``, ``decoder``,
    ``decoder_norm``, ``prediction``, ``contrastive``, ``head``,
    ``weight_copies``); ``attention`` is the ``c`` of
    :func:`attention_constant`."""
    g, b, s, c = geometry, int(batch_size), int(compute_bytes), attention
    if b < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    n, d = g.num_patches, g.hidden_dim
    parts = {}
    if g.job == "linprobe":  # frozen encoder in inference: one block's working set, no backward through it
        t = 1 + n
        parts["encoder_blocks"] = inference_block_bytes(b, t, d, g.num_heads, g.mlp_ratio, s, c, backend)
        parts["head"] = b * d * (2 * max(s, 4) + 2 * s) + b * g.num_classes * (s + 4)
    else:
        parts["patch_embed"] = b * n * g.patch_dim * s  # the patchified images, kept by the embedding matmul
        if g.job == "finetune":
            t = 1 + n
            parts["encoder_blocks"] = g.depth * block_activation_bytes(b, t, d, g.num_heads, g.mlp_ratio, s, c, backend)
            if g.pool == "cls":
                parts["encoder_norm"] = _norm_bytes(b, t, d, s)
            parts["head"] = b * d * (max(s, 4) + s) + b * g.num_classes * (s + 4)
        else:
            rows = 2 * b if g.job == "lcmae" else b
            t_enc, t_dec = 1 + g.visible, 1 + n
            w, out = g.decoder_hidden_dim, g.prediction_dim
            parts["encoder_blocks"] = g.depth * block_activation_bytes(
                rows, t_enc, d, g.num_heads, g.mlp_ratio, s, c, backend
            )
            parts["encoder_norm"] = _norm_bytes(rows, t_enc, d, s)  # its output is the decoder_embed's input
            if g.decoder == "transformer":
                parts["decoder"] = g.decoder_depth * block_activation_bytes(
                    rows, t_dec, w, g.decoder_num_heads, g.decoder_mlp_ratio, s, c, backend
                )
            elif g.decoder == "gaussian":  # the (N, N) weights and tokens of the average, one MLP half-block
                parts["decoder"] = rows * n * (n * s + w * ((3 + 2 * g.decoder_mlp_ratio) * s + max(s, 4)))
            else:  # the conv's input
                parts["decoder"] = rows * n * w * s
            parts["decoder_norm"] = _norm_bytes(rows, t_dec, w, s)
            parts["prediction"] = rows * n * out * (s + 4)  # kept by the trainer; the float32 error the loss squares
            if g.job == "lcmae":
                m = n - g.visible
                width = out if g.projector_input == "pred" else w
                narrow = width + 1 < g.projector_dim  # v is never materialised (losses.contrastive_terms)
                kept = 4 * (width + 1) if narrow else 3 * g.projector_dim
                parts["contrastive"] = rows * m * kept * 4 + 3 * rows * m * m * 4
    trainable = g.trainable_params if g.trainable_params is not None else count_params(g)[0]
    if s < g.param_bytes and g.job != "linprobe":
        parts["weight_copies"] = int(trainable * s)  # the 16-bit casts of the kernels the matmuls keep
    return {k: int(v) for k, v in parts.items()}


def estimate_training_memory(
    model=None,
    batch_size=None,
    *,
    compute_dtype=None,
    optimizer=None,
    accum_steps=None,
    attention="auto",
    backend=None,
    **geometry,
):
    """Bytes per device of one training step (:mod:`keras_lcmae.memory` docstring): a dict with
    ``parameters``, ``gradients``, ``optimizer_state``, ``accumulators``,
    ``activations`` and ``total`` (ints).

    Args:
        model: a built model (:class:`~keras_lcmae.MAE`, ``LCMAE``,
            ``AutoEncoder``, ``ViTClassifier``; a ``ViTEncoder`` with
            ``job=``), whose sizes and weight counts are read
            (:func:`model_geometry`); or a :class:`Geometry`; or None, with
            the sizes as keyword arguments (``job=``, ``image_size=``, ...).
        batch_size: the per-device micro-batch (the global batch divided by
            the replicas and by the accumulation steps).
        compute_dtype: bytes (4, 2), a dtype or policy name
            (``"mixed_bfloat16"``) or a ``keras.DTypePolicy``; default: the
            model's policy, else Keras' global one.
        optimizer: an optimizer instance, a name (``"adamw"``, ``"lars"``)
            or its slot count; default: ``model.optimizer`` when compiled,
            else AdamW for pretraining and finetuning, LARS for the probe.
        accum_steps: gradient accumulation ``K``; default: the optimizer's
            (``accum_steps`` or Keras' ``gradient_accumulation_steps``), else 1.
        attention: the attention-matrix constant ``c``: ``"auto"`` (what the
            backend runs), ``"fused"``, ``"explicit"`` or a number
            (:func:`attention_constant`).
        backend: plan for another Keras backend than this process's.
        **geometry: :class:`Geometry` fields, overriding the model's.

    Example (ViT-B/16 finetuning planned for JAX; PyTorch's fused attention
    keeps less, ``backend="torch"`` gives 5.65 GiB):

    >>> from keras_lcmae.memory import fits, format_bytes, summarize
    >>> est = estimate_training_memory(job="finetune", batch_size=64, image_size=224,
    ...                                compute_dtype="mixed_bfloat16", attention="fused", backend="jax")
    >>> format_bytes(est["total"]), fits(est, 80)
    ('8.89 GiB', True)
    >>> summarize(est)
    'total 8.89 GiB: activations 7.6 GiB, optimizer state 660 MiB, parameters 330 MiB, gradients 330 MiB'
    """
    if isinstance(model, Geometry):
        g = dataclasses.replace(model, **geometry) if geometry else model
    elif model is None:
        if "job" not in geometry:
            raise ValueError("Pass a model, a Geometry, or the sizes with job= (mae, lcmae, ae, finetune, linprobe).")
        g = Geometry(**geometry)
    else:
        g = model_geometry(model, **geometry)
    if batch_size is None or isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size (the per-device micro-batch) must be a positive integer, got {batch_size!r}.")
    if compute_dtype is None:
        compute_dtype = getattr(model, "dtype_policy", None) or keras.config.dtype_policy()
    s = dtype_bytes(compute_dtype)
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None) or ("lars" if g.job == "linprobe" else "adamw")
    slots = optimizer_slots(optimizer)
    if accum_steps is None:
        accum_steps = optimizer_accum_steps(optimizer) if not isinstance(optimizer, (int, str)) else 1
    if isinstance(accum_steps, bool) or int(accum_steps) != accum_steps or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}.")
    backend = _backend(backend)
    c = attention_constant(attention, backend, s)
    trainable, total = count_params(g)
    trainable = g.trainable_params if g.trainable_params is not None else trainable
    total = g.total_params if g.total_params is not None else total
    weight_bytes = g.param_bytes
    est = {
        "parameters": int(round(total * weight_bytes)),
        "gradients": int(round(trainable * weight_bytes)),
        "optimizer_state": int(round(slots * trainable * weight_bytes)),
        "accumulators": int(round(trainable * 4)) if accum_steps > 1 else 0,
        "activations": sum(activation_breakdown(g, batch_size, s, c, backend).values()),
    }
    est["total"] = sum(est.values())
    return est
