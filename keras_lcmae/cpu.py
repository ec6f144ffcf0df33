"""Training on the CPU: the host allocator, and whether this processor
multiplies 16-bit floats natively.

**The allocator.** A training step frees and re-allocates the same
activation-sized buffers (megabytes each) every step. glibc's ``malloc``
serves blocks above its mmap threshold with fresh ``mmap`` pages and gives
freed memory at the top of its heap back to the kernel, so each step
page-faults and zero-fills its activations anew. :func:`keep_freed_memory`
raises both thresholds, so freed blocks are reused, and the process keeps
its high-water mark instead of handing memory back between steps. Our
models' peak RSS stayed within 1 %; a fixed threshold can fragment other
programs' heaps more (``docs/benchmarks.md``, "Allocator A/B"). The recipes
call it; ``tools/benchmark.py`` measures it.

**16-bit floats.** bf16 and fp16 training only pay on a CPU with 16-bit
matrix instructions (x86: AVX-512 BF16 / AVX512-FP16 or AMX; Arm: the BF16
extension, half-precision SIMD). Without them the backends emulate them,
and a bf16 step takes many times the float32 one (most on PyTorch;
``docs/benchmarks.md`` has the measurements). :func:`cpu_precision_warning`
says so before a run starts; the pretraining recipe logs it.
"""

import ctypes
import os

# No module-level Keras import: tools/benchmark.py loads this file alone to
# tune the allocator of its transformers (non-Keras) worker.

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# glibc takes an mmap threshold up to half its heap size: 32 MiB on 64-bit
# (64 MiB heaps), 512 KiB on 32-bit
MMAP_THRESHOLD_MAX = (32 << 20) if ctypes.sizeof(ctypes.c_long) == 8 else (512 << 10)
_INT_MAX = 2**31 - 1


def _glibc_malloc():
    """glibc, when it is the malloc this process runs, else None (not glibc:
    macOS, musl, Windows; or another allocator such as jemalloc or tcmalloc
    preloaded over glibc's)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        used = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    except (OSError, AttributeError, TypeError):
        return None
    return libc if used == ctypes.cast(libc.malloc, ctypes.c_void_p).value else None


def keep_freed_memory(mmap_threshold=MMAP_THRESHOLD_MAX, trim_threshold=_INT_MAX, top_pad=64 << 20):
    """Makes glibc's ``malloc`` keep and reuse freed memory: blocks up to
    ``mmap_threshold`` bytes come from the heap, and the heap is not trimmed
    back to the kernel until ``trim_threshold`` bytes are free at its top
    (``top_pad``: extra bytes per heap growth). Process-wide and lasting.

    Returns the settings applied as a dict; None, changing nothing, where
    this process's malloc is not glibc's (see :func:`_glibc_malloc`) or
    glibc refuses the mmap threshold (a ``glibc.malloc.hugetlb`` tunable
    shrinks its heaps). Raises ValueError for a setting outside 0 to its
    limit (:data:`MMAP_THRESHOLD_MAX` for ``mmap_threshold``, 2**31 - 1 for
    the others), before anything is applied.
    """
    settings = {"mmap_threshold": int(mmap_threshold), "trim_threshold": int(trim_threshold), "top_pad": int(top_pad)}
    limits = {"mmap_threshold": MMAP_THRESHOLD_MAX, "trim_threshold": _INT_MAX, "top_pad": _INT_MAX}
    for key, value in settings.items():  # all checked before any is applied
        if not 0 <= value <= limits[key]:
            raise ValueError(f"{key}={value}: keep_freed_memory takes 0 to {limits[key]} bytes")
    libc = _glibc_malloc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: if glibc refuses it, nothing has changed
    if mallopt(_M_MMAP_THRESHOLD, settings["mmap_threshold"]) != 1:
        return None
    mallopt(_M_TRIM_THRESHOLD, settings["trim_threshold"])
    mallopt(_M_TOP_PAD, settings["top_pad"])
    return settings


# /proc/cpuinfo flags that give native 16-bit matrix arithmetic
NATIVE_16BIT_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),  # x86 AVX-512 BF16, x86 AMX, Arm BF16 extension
    "float16": ("avx512_fp16", "amx_fp16", "asimdhp"),  # x86 AVX512-FP16, x86 AMX-FP16, Arm half-precision SIMD
}


def cpu_flags(path="/proc/cpuinfo"):
    """The first processor's feature flags (x86 ``flags``, Arm ``Features``)
    as a frozenset, or None where ``path`` cannot be read (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def native_cpu_dtype(dtype, cpuinfo="/proc/cpuinfo"):
    """True when the CPU multiplies ``dtype`` (a dtype name: "bfloat16" or
    "float16") natively, False when it does not, None when unknown
    (``cpuinfo`` unreadable). Other dtypes (float32) are always native."""
    if dtype not in NATIVE_16BIT_FLAGS:
        return True
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return None
    return any(flag in flags for flag in NATIVE_16BIT_FLAGS[dtype])


def backend_on_cpu():
    """Whether the Keras backend computes on the CPU (no GPU or TPU in use)."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        # where Keras puts a tensor (KERAS_TORCH_DEVICE, else mps, cuda, xpu)
        return keras.ops.zeros(()).device.type == "cpu"
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return True


def cpu_precision_warning(policy, cpuinfo="/proc/cpuinfo", on_cpu=None):
    """A warning (str) when the dtype policy ``policy`` (a name such as
    ``"mixed_bfloat16"`` or a ``keras.DTypePolicy``) computes in a 16-bit
    float on a CPU without native support for it; None otherwise.

    ``cpuinfo`` (the file the flags are read from) and ``on_cpu`` (default:
    :func:`backend_on_cpu`) are arguments so that the check can be tested
    anywhere.
    """
    import keras

    policy = keras.dtype_policies.get(policy) if isinstance(policy, str) else policy
    compute = keras.backend.standardize_dtype(policy.compute_dtype)
    if compute not in NATIVE_16BIT_FLAGS:
        return None
    on_cpu = backend_on_cpu() if on_cpu is None else on_cpu
    if not on_cpu:
        return None
    if native_cpu_dtype(compute, cpuinfo) is not False:
        return None
    wanted = " or ".join(NATIVE_16BIT_FLAGS[compute])
    return (
        f"dtype policy {policy.name!r} computes in {compute} on a CPU without native {compute} arithmetic "
        f"(none of the cpuinfo flags {wanted}; {os.cpu_count()} CPUs), where the backends emulate it: "
        f"{_EMULATED[compute]}. Use float32 (--mixed_precision=none) on this machine."
    )


# what emulation cost on a 2-core AVX2 EPYC (docs/benchmarks.md), quoted in the warning
_EMULATED = {
    "bfloat16": "tiny32 MAE took 16x the float32 step on PyTorch, 1.7x on TensorFlow, 1.2x on JAX",
    "float16": "a PyTorch float16 matmul took 65x the float32 one",
}
