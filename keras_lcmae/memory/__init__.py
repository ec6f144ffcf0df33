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

from keras_lcmae.memory.estimate import (
    BLOCK_CONSTANTS,
    ESTIMATE_KEYS,
    OPTIMIZER_SLOTS,
    activation_breakdown,
    attention_constant,
    block_activation_bytes,
    block_constants,
    dtype_bytes,
    estimate_training_memory,
    inference_block_bytes,
    optimizer_accum_steps,
    optimizer_slots,
)
from keras_lcmae.memory.geometry import DECODERS, JOBS, PRETRAIN_JOBS, Geometry, count_params, model_geometry
from keras_lcmae.memory.measure import measure_step_memory, return_freed_memory
from keras_lcmae.memory.report import DEFAULT_HEADROOM, fits, format_bytes, summarize

__all__ = [
    "BLOCK_CONSTANTS",
    "DECODERS",
    "DEFAULT_HEADROOM",
    "ESTIMATE_KEYS",
    "JOBS",
    "OPTIMIZER_SLOTS",
    "PRETRAIN_JOBS",
    "Geometry",
    "activation_breakdown",
    "attention_constant",
    "block_activation_bytes",
    "block_constants",
    "count_params",
    "dtype_bytes",
    "estimate_training_memory",
    "fits",
    "format_bytes",
    "inference_block_bytes",
    "measure_step_memory",
    "model_geometry",
    "optimizer_accum_steps",
    "optimizer_slots",
    "return_freed_memory",
    "summarize",
]
