"""PyTorch's multi-tensor optimizer kernels, for the updates of
:mod:`keras_lcmae.optim` on the PyTorch backend.

Keras' PyTorch optimizers update one variable at a time and make temporary
copies of every parameter per step; ``torch._fused_adamw_`` (one pass over
``p, g, m, v`` on the CPU) and the ``torch._foreach_*`` operations (in
place, over all tensors at once) compute the same update without them
(``docs/benchmarks.md`` has the timings). These are private PyTorch APIs,
used only here; callers check :func:`fused_adamw_usable` (or the backend)
and :func:`keras_lcmae.backend.use_fast_paths` first.
"""

import keras
from keras import ops

from keras_lcmae.backend import use_fast_paths


def is_torch():
    """Whether the Keras backend is PyTorch and the speed paths are on."""
    return use_fast_paths() and keras.backend.backend() == "torch"


def fused_adamw_usable(variables):
    """Whether PyTorch's fused AdamW kernel can update ``variables``: the
    PyTorch backend with the speed paths on, tensors on the CPU (where
    foreach operations are per-tensor loops and the fused kernel makes one
    pass)."""
    if not variables or not is_torch():
        return False
    import torch

    return hasattr(torch, "_fused_adamw_") and variables[0].value.device.type == "cpu"


def as_torch_like(gradient, tensor):
    """``gradient`` (a torch tensor, or an array a user passed to
    ``optimizer.apply``) as a torch tensor of ``tensor``'s dtype and device."""
    import torch

    return torch.as_tensor(gradient, device=tensor.device).to(tensor.dtype)


def _adam_tensors(variables, momentums, velocities, grads):
    params = [v.value for v in variables]
    m = [s.value for s in momentums]
    v2 = [s.value for s in velocities]
    return params, m, v2, [as_torch_like(g, p) for g, p in zip(grads, params)]


def fused_adamw_groups(variables, grads, momentums, velocities, groups, step, beta_1, beta_2, eps):
    """Runs ``torch._fused_adamw_`` once per group; ``groups`` maps
    ``(lr, weight_decay)`` (host floats) to indices into ``variables``;
    ``momentums`` and ``velocities`` are the Adam slots of ``variables``, in
    order; ``step`` is the 1-based update count. The kernel is
    ``torch.optim.AdamW``'s: ``p *= 1 - lr wd``; ``p -= lr / (1 - b1^t) * m /
    (sqrt(v) / sqrt(1 - b2^t) + eps)``."""
    import torch

    with torch.no_grad():
        params, m, v2, grads = _adam_tensors(variables, momentums, velocities, grads)
        t = torch.tensor(float(step), dtype=torch.float32)
        for (lr, wd), idx in groups.items():
            torch._fused_adamw_(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [m[i] for i in idx],
                [v2[i] for i in idx],
                [],
                [t] * len(idx),
                lr=lr,
                beta1=beta_1,
                beta2=beta_2,
                weight_decay=wd,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )


def foreach_keras_adam(variables, grads, momentums, velocities, learning_rate, step, beta_1, beta_2, eps):
    """Keras' Adam update (no decay) with in-place foreach operations:
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``p -= lr
    sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``; ``step`` is the
    1-based update count (a tensor), ``learning_rate`` a tensor."""
    import torch

    with torch.no_grad():
        params, m, v2, grads = _adam_tensors(variables, momentums, velocities, grads)
        dtype = params[0].dtype
        step = ops.cast(step, dtype)
        lr = ops.cast(learning_rate, dtype)
        alpha = (
            lr * ops.sqrt(1 - ops.power(ops.cast(beta_2, dtype), step)) / (1 - ops.power(ops.cast(beta_1, dtype), step))
        )
        torch._foreach_lerp_(m, grads, 1 - beta_1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(v2, beta_2)
        torch._foreach_addcmul_(v2, grads, grads, value=1 - beta_2)
        denom = torch._foreach_sqrt(v2)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, -alpha)  # p += m / (denom / -alpha)
        torch._foreach_addcdiv_(params, m, denom)


def accumulate(accumulators, grads):
    """Adds ``grads`` to the ``accumulators`` (torch tensors) in place, with
    one foreach operation; returns the gradients as torch tensors."""
    import torch

    with torch.no_grad():
        grads = [as_torch_like(g, a) for g, a in zip(grads, accumulators)]
        torch._foreach_add_(accumulators, grads)
    return grads
