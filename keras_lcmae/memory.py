"""How much memory one training step needs per device, before running it.

:func:`estimate_training_memory` gives the bytes of one training step of the
three jobs of the recipes, per device (per replica: pass the per-device
micro-batch), as a dict of ints:

* ``parameters``: every weight (trainable or not) in its variable dtype
  (float32, also under mixed precision);
* ``gradients``: one gradient per trainable weight, in the variable dtype;
* ``optimizer_state``: ``slots`` copies of the trainable weights (AdamW and
  :class:`~keras_lcmae.LayerDecayAdamW` 2: first and second moments;
  :class:`~keras_lcmae.LARS` 1: momentum; SGD 0);
* ``accumulators``: gradient accumulation over ``K > 1`` micro-batches keeps
  one more float32 copy of the trainable weights (the summed gradients);
  0 for ``K = 1``;
* ``activations``: the tensors the forward pass keeps for the backward pass
  (below), plus, under mixed precision, the 16-bit copies of the trained
  weights that the matmuls keep;
* ``total``: their sum. Gradients and activations are never both whole (the
  gradients appear while the backward frees the activations), so the sum is
  an upper bound of the live tensors, and the slack covers the backward's
  own temporaries (the gradients of one block's activations); see "Checked"
  below.

The three jobs:

* **pretraining** (``"mae"``, ``"lcmae"``, ``"ae"``): the patch embedding of
  all ``N`` patches, the encoder on ``T_e = 1 + N(1 - r)`` tokens (``[CLS]``
  and the visible ones, ``r`` the mask ratio; ``AE``: all ``1 + N``), the
  decoder on ``T_d = 1 + N`` tokens, the prediction ``(B, N, P)`` and the
  loss. LC-MAE runs two views, i.e. ``2B`` rows through encoder and decoder
  (the patch embedding once), plus its contrastive terms on the ``M = N - K``
  masked tokens of each view (the projector's outputs, or, when it widens its
  input as by default, the narrow features and ``W W^T``; and three
  ``(2B, M, M)`` cosine matrices; all float32).
* **finetuning** (``"finetune"``, :class:`~keras_lcmae.ViTClassifier`): the
  encoder on all ``1 + N`` tokens, every weight trained.
* **linear probe** (``"linprobe"``): the frozen encoder runs in inference, so
  no activation is kept for the backward; only the head trains. What it
  needs is the inference working set of the widest moment of one block
  (``(4 + 2m)·D`` per token on PyTorch, ``(1 + 2m)·D`` under XLA:
  :func:`inference_block_bytes`), not a sum over blocks.

**Activations of one pre-norm ViT block** (``x + attn(norm1(x))``, then
``x + mlp(norm2(x))``; ``B`` rows, ``T`` tokens, width ``D``, ``h`` heads, MLP
ratio ``m``, ``s`` bytes per element of the compute dtype, ``l = max(s, 4)``
the bytes of LayerNorm's tensors, which Keras computes in float32 under
mixed precision)::

    bytes ≈ B·T·(a_s·D·s + a_l·D·l + a_0) + B·h·T²·c·s

    PyTorch:            a_s = 7 + 2m, a_l = 2, a_0 = 16 + 4h (fused) or 16
    JAX and TensorFlow: a_s = 6 + 4m, a_l = 6, a_0 = 32

i.e. in float32 with ``m = 4``: ``17·D·4`` bytes a token on PyTorch,
``28·D·4`` on JAX and TensorFlow. What each constant counts, the tensors
kept for the backward pass:

PyTorch (the fused LayerNorm and GELU kernels keep only their inputs):

* ``a_l = 2``: the inputs of ``norm1`` and ``norm2`` (the residual stream
  before each branch);
* ``2`` of ``a_s``: the outputs of ``norm1`` and ``norm2``, the inputs of
  the ``qkv`` and ``fc1`` matmuls (a matmul keeps its input for the weight
  gradient);
* ``5`` of ``a_s``, attention: ``q``, ``k``, ``v`` (3, the contiguous copies
  the attention kernel keeps), its output ``(B, h, T, D/h)`` (1, kept by
  the fused kernel's backward; the explicit path keeps the scaled ``q``
  instead) and that output transposed back to ``(B, T, D)``, the input of
  ``proj`` (1: the transpose is a copy);
* ``2m`` of ``a_s``: the MLP hidden before GELU (GELU's backward reads its
  input) and after it (``fc2``'s input);
* ``a_0``: the float32 mean and reciprocal std of each LayerNorm (16 bytes
  a token), and the fused attention's float32 log-sum-exp per head (``4h``).

JAX and TensorFlow (Keras' LayerNormalization and exact GELU there are
compositions of elementwise operations, and the autodiff keeps their
intermediates; listed with ``jax.ad_checkpoint`` residuals): ``a_l = 6``,
three float32 tensors per LayerNorm (input, centred input, scaled
normalised input); ``a_s = 2 + 4 + 4m``: the two norm outputs, ``q``, ``k``,
``v`` and the attention output (4), and four ``mD`` tensors of the erf GELU
(its scaled input, ``erfc``, ``exp`` and the input); ``a_0 = 32``, the
statistics.

The residual additions and the output projections keep nothing (an
addition needs no input for its gradient; the next consumer keeps the sum).

The ``T²`` term, the attention matrix, ``c`` elements per ``(row, head,
query, key)`` (:func:`attention_constant`):

* ``c = 0`` where the backend's fused attention runs: PyTorch's
  ``scaled_dot_product_attention`` (flash-style kernels on the GPU and, in
  float32, on the CPU) never materialises the ``T x T`` probabilities; its
  backward recomputes them from ``q``, ``k`` and the log-sum-exp;
* ``c = 1`` on PyTorch's explicit matmul-softmax-matmul path (16-bit on the
  CPU, where :func:`keras_lcmae.layers.fused_attention_is_fast` takes it):
  the probabilities, which the softmax's and the second matmul's backward
  both read;
* ``c = 2`` on JAX and TensorFlow (Keras' XLA attention): the softmax's
  exponentials and the probabilities.

Outside the blocks: the patchified images (``N·p²C·s`` per image, the patch
embedding's input), the final norms (input and output on every token), the
prediction and the float32 error the loss squares (``N·P·(s + 4)`` per
row), the classifier's pooled features; small next to the blocks.

**Checked** (``tests/test_memory.py``): with PyTorch on the CPU in float32
the tensors a training step saves (``torch.autograd.graph.saved_tensors_hooks``)
are the ones above, 17 ``D``-wide tensors a block; and
:func:`measure_step_memory` reads the peak of a step above the memory held
between steps within 30 % of ``activations + gradients``. ViT 192 x 4, 64
px, patch 8, batch 32 (decoder 128 x 2, 4 heads; LC-MAE projector 1024), MiB
measured / estimated:

=========== ============= ============= ============= =============
job          torch f32     torch bf16*   JAX f32       TF f32**
=========== ============= ============= ============= =============
finetune     113 / 112     67 / 72       207 / 192     203 / 192
MAE          75 / 78       50 / 55       135 / 127     120 / 127
LC-MAE       157 / 157     103 / 108     304 / 255     242 / 255
linprobe     20 / 18       11 / 11       17 / 15       14 / 15
=========== ============= ============= ============= =============

(*) on a CPU with AMX-BF16 (explicit attention, ``c = 1``); (**) with
``TF_ENABLE_ONEDNN_OPTS=0``, whose allocator returns freed memory (oneDNN's
keeps it, so the resident size cannot be read there). The test runs the
float32 PyTorch column.

Not counted: the framework's own memory (CUDA context, cuDNN/cuBLAS
workspaces, compiled programs), the allocator's caching and fragmentation,
the input pipeline's prefetched batches, the extra inference pass of
self-guided masking (no backward, a fraction of the step), and the
optimizer update's temporaries after the backward, when the activations are
gone (with ``K > 1``: the mean gradient on PyTorch, one copy of the weights;
on JAX and TensorFlow the masked update's copies of each weight and its
slots). :func:`fits` leaves headroom for them.
"""

import dataclasses
import math

PRETRAIN_JOBS = ("mae", "lcmae", "ae")
JOBS = PRETRAIN_JOBS + ("finetune", "linprobe")
DECODERS = ("transformer", "gaussian", "conv")
ESTIMATE_KEYS = ("parameters", "gradients", "optimizer_state", "accumulators", "activations", "total")

# Share of the device memory :func:`fits` keeps free: the CUDA context and
# the cuDNN/cuBLAS workspaces (0.5-1 GB), the caching allocator's
# fragmentation, and the approximation of the estimate (within 30 % of a
# measured step; see the module docstring).
DEFAULT_HEADROOM = 0.10

# Optimizer state per trainable weight, in copies of it, by (lower-case)
# optimizer class or name.
OPTIMIZER_SLOTS = {
    "adamw": 2, "adam": 2, "layerdecayadamw": 2, "layer_decay_adamw": 2, "lamb": 2, "nadam": 2, "adamax": 2,
    "lars": 1, "momentum": 1, "rmsprop": 1, "adagrad": 1, "lion": 1, "sgd": 0,
}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sizes :func:`estimate_training_memory` reads, for a model that
    need not be built. :func:`model_geometry` reads them off a model.

    The defaults are ViT-B/16 at 224 px with MAE's 512 x 8 decoder (16
    heads), mask ratio 0.75, LC-MAE's 1024-wide projector and 1000 classes.
    ``trainable_params`` / ``total_params`` of ``None`` are counted from the
    sizes (:func:`count_params`); ``param_bytes`` is the bytes per weight
    (4: float32 variables, as under mixed precision; 2 for a model whose
    variables are 16-bit).

    Example:
    >>> g = Geometry(job="lcmae", image_size=224, decoder_depth=2)
    >>> g.num_patches, g.visible, g.prediction_dim
    (196, 49, 768)
    """

    job: str
    image_size: tuple = (224, 224)
    patch_size: int = 16
    num_channels: int = 3
    hidden_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    decoder: str = "transformer"
    decoder_hidden_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    decoder_kernel: int = 5
    output_dim: int = None  # values predicted per token (default: one patch, p*p*C)
    projector_dim: int = 1024
    projector_input: str = "pred"
    num_classes: int = 1000
    pool: str = "cls"
    trainable_params: int = None
    total_params: int = None
    param_bytes: int = 4

    def __post_init__(self):
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {JOBS}, got {self.job!r}.")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}.")
        size = self.image_size
        size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(v) for v in size)
        object.__setattr__(self, "image_size", size)
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"image_size={size} is not a multiple of patch_size={self.patch_size}.")
        if self.job in PRETRAIN_JOBS and self.job != "ae" and not 0.0 < float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {self.mask_ratio!r}.")

    @property
    def num_patches(self):
        return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

    @property
    def patch_dim(self):
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def prediction_dim(self):
        return self.output_dim or self.patch_dim

    @property
    def visible(self):
        """``K``: the patches the encoder sees (all of them for AE and the classifiers)."""
        if self.job not in ("mae", "lcmae"):
            return self.num_patches
        from keras_lcmae.masking import num_visible  # noqa: PLC0415

        return num_visible(self.num_patches, self.mask_ratio)


def _block_params(d, m):
    hidden = int(d * m)
    return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)


def count_params(geometry):
    """``(trainable, total)`` weights of the model ``geometry`` describes,
    counted from its sizes as this package builds it: the position tables
    are fixed in pretraining and trained in finetuning; a classifier with
    ``pool="avg"`` keeps the encoder's final norm frozen and unused; the
    linear probe trains its head only (its BatchNorm has no affine
    weights, only its two moving statistics)."""
    g = geometry
    d, n, p = g.hidden_dim, g.num_patches, g.patch_dim
    pos = (1 + n) * d
    encoder = (p * d + d) + d + g.depth * _block_params(d, g.mlp_ratio) + 2 * d  # embed, [CLS], blocks, norm
    if g.job in PRETRAIN_JOBS:
        w, out = g.decoder_hidden_dim, g.prediction_dim
        decoder = (d * w + w) + w + 2 * w + (w * out + out)  # embed, mask token, norm, prediction
        if g.decoder == "transformer":
            decoder += g.decoder_depth * _block_params(w, g.decoder_mlp_ratio)
        elif g.decoder == "gaussian":
            hidden = int(w * g.decoder_mlp_ratio)
            decoder += 2 * w + (w * hidden + hidden) + (hidden * w + w)
        else:
            decoder += g.decoder_kernel**2 * w * w + w
        trainable = encoder + decoder
        if g.job == "lcmae":
            width = out if g.projector_input == "pred" else w
            trainable += width * g.projector_dim + g.projector_dim
        return trainable, trainable + pos + (1 + n) * w
    head = d * g.num_classes + g.num_classes
    if g.job == "linprobe":
        norms = 2 * d if g.pool == "avg" else 0  # fc_norm, frozen in the probe
        return head, encoder + pos + norms + 2 * d + head  # + BatchNorm's moving mean and variance
    if g.pool == "avg":  # the encoder's final norm frozen (unused), fc_norm trained: as many trained weights
        return encoder + pos + head, encoder + pos + 2 * d + head
    return encoder + pos + head, encoder + pos + head


def model_geometry(model, **overrides):
    """The :class:`Geometry` of a built model: an :class:`~keras_lcmae.MAE`,
    :class:`~keras_lcmae.LCMAE`, :class:`~keras_lcmae.AutoEncoder`,
    :class:`~keras_lcmae.ViTClassifier`, or a bare
    :class:`~keras_lcmae.ViTEncoder` with ``job=`` given. The weight counts
    and bytes are the model's own; ``overrides`` replace any field."""
    from keras_lcmae.classifier import ViTClassifier  # noqa: PLC0415
    from keras_lcmae.decoders import ConvDecoder, GaussianAverageDecoder  # noqa: PLC0415
    from keras_lcmae.encoder import ViTEncoder  # noqa: PLC0415
    from keras_lcmae.models import LCMAE, AutoEncoder, ReconstructionModel  # noqa: PLC0415

    fields = {}
    if isinstance(model, ViTClassifier):
        encoder = model.encoder
        fields.update(job="linprobe" if model.linear_probe else "finetune", num_classes=model.num_classes,
                      pool=model.pool)
    elif isinstance(model, ReconstructionModel):
        encoder = model.encoder
        job = "lcmae" if isinstance(model, LCMAE) else "ae" if isinstance(model, AutoEncoder) else "mae"
        decoder = model.decoder
        kind = "gaussian" if isinstance(decoder, GaussianAverageDecoder) else "conv" if isinstance(decoder, ConvDecoder) else "transformer"
        fields.update(job=job, decoder=kind, decoder_hidden_dim=decoder.hidden_dim, output_dim=model.decoder_output_dim())
        if job != "ae":  # AE(k) masks nothing
            fields.update(mask_ratio=model.mask_ratio)
        if kind == "transformer":
            fields.update(decoder_depth=decoder.depth, decoder_num_heads=decoder.num_heads,
                          decoder_mlp_ratio=decoder.mlp_ratio)
        elif kind == "gaussian":
            fields.update(decoder_depth=0, decoder_mlp_ratio=decoder.mlp_ratio)
        else:
            fields.update(decoder_depth=0, decoder_kernel=decoder.kernel_size)
        if job == "lcmae":
            fields.update(projector_dim=model.projector_dim, projector_input=model.projector_input)
    elif isinstance(model, ViTEncoder):
        encoder = model
        if "job" not in overrides:
            raise ValueError("A bare ViTEncoder needs job= (one of 'mae', 'lcmae', 'ae', 'finetune', 'linprobe').")
    else:
        raise ValueError(
            f"estimate_training_memory reads MAE, LCMAE, AutoEncoder, ViTClassifier or ViTEncoder models, got "
            f"{type(model).__name__}; pass a Geometry for anything else."
        )
    fields.update(image_size=tuple(encoder.image_size), patch_size=encoder.patch_size,
                  num_channels=encoder.num_channels, hidden_dim=encoder.hidden_dim, depth=encoder.depth,
                  num_heads=encoder.num_heads, mlp_ratio=encoder.mlp_ratio)
    if not isinstance(model, ViTEncoder):
        weights = model.weights
        trainable = {id(v) for v in model.trainable_weights}
        fields["trainable_params"] = sum(_size(v) for v in weights if id(v) in trainable)
        fields["total_params"] = sum(_size(v) for v in weights)
        counted = sum(_size(v) * _itemsize(v.dtype) for v in weights)
        fields["param_bytes"] = counted / max(fields["total_params"], 1)
    fields.update(overrides)
    return Geometry(**fields)


def _size(v):
    return int(math.prod(int(s) for s in v.shape))


def _itemsize(dtype):
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}.get(name, 4)


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
    query, key)`` (module docstring): ``"fused"`` 0, ``"explicit"`` 1 on
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
            from keras_lcmae.cpu import backend_on_cpu  # noqa: PLC0415

            on_cpu = backend_on_cpu()
        return 1 if on_cpu else 0
    return 2


def _backend(backend):
    if backend is None:
        import keras  # noqa: PLC0415

        backend = keras.backend.backend()
    if backend not in BLOCK_CONSTANTS:
        raise ValueError(f"backend must be one of {sorted(BLOCK_CONSTANTS)}, got {backend!r}.")
    return backend


def block_constants(backend, mlp_ratio=4.0):
    """``(a_s, a_l, a_0)`` of :func:`block_activation_bytes` for a backend:
    per token, ``a_s`` tensors ``D`` wide in the compute dtype, ``a_l`` in
    LayerNorm's (at least float32) and ``a_0`` bytes of statistics (module
    docstring, where each is accounted for)."""
    ln, mlp, stats = BLOCK_CONSTANTS[_backend(backend)]
    return (7 if ln == 2 else 6) + mlp * mlp_ratio, ln, stats


# per backend: D-wide LayerNorm tensors (float32), MLP-hidden tensors per
# (m D), bytes of statistics per token; the attention and norm outputs, the
# 5 (PyTorch) or 4 (XLA) D-wide tensors, are in block_constants
BLOCK_CONSTANTS = {"torch": (2, 2, 16), "jax": (6, 4, 32), "tensorflow": (6, 4, 32)}


def block_activation_bytes(batch, tokens, width, heads, mlp_ratio=4.0, compute_bytes=4, attention=0, backend="torch"):
    """Bytes one pre-norm Transformer block keeps for its backward pass:
    ``B·T·(a_s·D·s + a_l·D·l + a_0 + 4·h·f) + B·h·T²·c·s`` (module
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
            parts["encoder_blocks"] = g.depth * block_activation_bytes(rows, t_enc, d, g.num_heads, g.mlp_ratio, s, c, backend)
            parts["encoder_norm"] = _norm_bytes(rows, t_enc, d, s)  # its output is the decoder_embed's input
            if g.decoder == "transformer":
                parts["decoder"] = g.decoder_depth * block_activation_bytes(
                    rows, t_dec, w, g.decoder_num_heads, g.decoder_mlp_ratio, s, c, backend)
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


def estimate_training_memory(model=None, batch_size=None, *, compute_dtype=None, optimizer=None, accum_steps=None,
                             attention="auto", backend=None, **geometry):
    """Bytes per device of one training step (module docstring): a dict with
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
        import keras  # noqa: PLC0415

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


def format_bytes(n):
    """``1536`` -> ``"1.5 KiB"``; binary units up to TiB, 3 significant digits."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def summarize(estimate):
    """One line: the total and its parts, e.g. ``"total 2.1 GiB: activations
    1.4 GiB, parameters 330 MiB, ..."`` (largest part first; parts of 0 left
    out)."""
    parts = sorted(((k, v) for k, v in estimate.items() if k != "total" and v), key=lambda kv: -kv[1])
    text = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in parts)
    return f"total {format_bytes(estimate['total'])}: {text}"


def fits(estimate, device_memory_gb, headroom=DEFAULT_HEADROOM):
    """Whether ``estimate["total"]`` (or a byte count) fits a device of
    ``device_memory_gb`` GiB (2**30 bytes, as ``torch.cuda`` and ``nvidia-smi``
    count; an "80 GB" H100 has 79.6) with ``headroom`` (default 10 %) of it
    left free for what the estimate leaves out (:data:`DEFAULT_HEADROOM`)."""
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}.")
    if not device_memory_gb > 0:
        raise ValueError(f"device_memory_gb must be positive, got {device_memory_gb!r}.")
    total = estimate["total"] if isinstance(estimate, dict) else int(estimate)
    return total <= (1.0 - headroom) * device_memory_gb * 2**30


# -- measuring a step (PyTorch backend, Linux) ----------------------------------


def _proc_status():
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def return_freed_memory(mmap_threshold=64 << 10, trim_threshold=128 << 10):
    """Makes glibc's ``malloc`` hand freed memory back to the kernel at once
    (every block from ``mmap_threshold`` bytes up is its own mapping, the
    heap is trimmed above ``trim_threshold``), so that the resident size
    follows the live tensors. The opposite of
    :func:`keras_lcmae.cpu.keep_freed_memory`, and slower: for a measuring
    process only. Returns False (changing nothing) where malloc is not glibc's."""
    from keras_lcmae.cpu import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _glibc_malloc  # noqa: PLC0415

    import ctypes  # noqa: PLC0415

    libc = _glibc_malloc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def measure_step_memory(model, x, y=None, warmup=2, repeats=3):
    """The peak memory of one ``train_on_batch`` above the memory held
    between steps, on a Linux CPU: the measurement
    :func:`estimate_training_memory` is checked against.

    Method: :func:`return_freed_memory` (so the resident size follows the
    live tensors: PyTorch's CPU allocator has no cache, every tensor is a
    ``malloc``), ``warmup`` steps, then per repeat: free the gradients
    (PyTorch keeps them between steps), read the resident size (``VmRSS``:
    the weights, optimizer state and accumulators, the libraries), reset the
    kernel's high-water mark to it (``/proc/self/clear_refs``), run one step,
    read the high-water mark (``VmHWM``). ``step_bytes`` is the median of the
    differences, which compares with ``activations + gradients`` of the
    estimate. Repeats agreed within 0.2 MB in the tests. Meant for PyTorch;
    JAX's CPU buffers and TensorFlow's (with ``TF_ENABLE_ONEDNN_OPTS=0``)
    also come from ``malloc`` and read the same way, while oneDNN's
    TensorFlow allocator keeps freed memory (a step then reads near 0).

    Returns ``{"step_bytes", "baseline_bytes", "samples"}``; raises
    RuntimeError where ``/proc/self/clear_refs`` is missing (not Linux).
    """
    import gc  # noqa: PLC0415
    import os  # noqa: PLC0415
    import statistics  # noqa: PLC0415

    import keras  # noqa: PLC0415

    torch_backend = keras.backend.backend() == "torch"
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("measure_step_memory needs Linux's /proc/self/clear_refs (peak RSS reset).")
    return_freed_memory()
    for _ in range(warmup):
        model.train_on_batch(x, y)
    samples, base = [], None
    for _ in range(repeats):
        if torch_backend:
            model.zero_grad(set_to_none=True)
        gc.collect()
        base = _proc_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        model.train_on_batch(x, y)
        samples.append(_proc_status()["VmHWM"] - base)
    if torch_backend:
        model.zero_grad(set_to_none=True)
    return {"step_bytes": int(statistics.median(samples)), "baseline_bytes": base, "samples": samples}
