"""An estimate in words and against a device: sizes as text, a one-line
summary, whether it fits."""

# Share of the device memory :func:`fits` keeps free: the CUDA context and
# the cuDNN/cuBLAS workspaces (0.5-1 GB), the caching allocator's
# fragmentation, and the approximation of the estimate (within 30 % of a
# measured step; see the :mod:`keras_lcmae.memory` docstring).
DEFAULT_HEADROOM = 0.10


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
