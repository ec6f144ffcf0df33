"""Measuring the memory of one training step on a Linux CPU (the measurement
the estimate is checked against)."""

import ctypes
import gc
import os
import statistics

import keras

from keras_lcmae.cpu import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _glibc_malloc


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
