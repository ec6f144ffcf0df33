"""The machine a worker runs on: its device and peak memory, the host CPU's
name and bf16 support, and its malloc, read without importing Keras into
the main process."""

import os
import resource

from bench import ROOT


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_CPU_MODULE = []


def cpu_module():
    """``keras_lcmae/cpu.py`` loaded as a file: its allocator and cpuinfo
    helpers without importing Keras (and a backend) into this process."""
    if not _CPU_MODULE:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_lcmae_cpu", os.path.join(ROOT, "keras_lcmae", "cpu.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CPU_MODULE.append(module)
    return _CPU_MODULE[0]


def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU has bf16 matrix instructions (x86 AVX-512 BF16 or AMX,
    Arm BF16); None when cpuinfo has no flags line."""
    return cpu_module().native_cpu_dtype("bfloat16", cpuinfo)


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """``"cpu: <model> (<n> cores, <widest matrix ISA>)"``: the ISA (amx_bf16,
    avx512_bf16, avx512f, avx2) decides what bf16 and float32 cost, so it is
    named; it is left out where cpuinfo has no flags line."""
    name = "unknown"
    try:
        with open(cpuinfo) as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    flags = cpu_module().cpu_flags(cpuinfo) or ()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), None)
    return f"cpu: {name} ({cores} cores{', ' + isa if isa else ''})"


def device_and_memory(backend):
    """``(device, peak_device_mb)`` of the worker's backend: ``"gpu: <name>"``
    and the accelerator's peak allocated memory when the backend computes on
    a GPU, else ``(cpu_name(), None)``."""
    if backend in ("torch", "hf_torch"):
        import torch

        if torch.cuda.is_available():
            return f"gpu: {torch.cuda.get_device_name(0)}", torch.cuda.max_memory_allocated() / 2**20
    elif backend == "jax":
        import jax

        dev = jax.devices()[0]
        if dev.platform == "gpu":
            stats = dev.memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
            return f"gpu: {dev.device_kind}", (peak / 2**20 if peak is not None else None)
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "unknown")
            return f"gpu: {name}", tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return cpu_name(), None


def tune_allocator(setting):
    """Applies ``setting`` ("tuned": ``keras_lcmae.cpu.keep_freed_memory``,
    or "default") to this process's malloc; returns what the record says.
    :func:`cpu_module` keeps Keras out of the HF worker."""
    if setting != "tuned":
        return "default"
    return "tuned" if cpu_module().keep_freed_memory() else "default (not glibc's malloc)"
