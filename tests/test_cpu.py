"""keras_lcmae.cpu: the host allocator that keeps freed memory, and the
check that warns before 16-bit training on a CPU that emulates it."""

import os
import subprocess
import sys

import keras
import pytest

from tests.conftest import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates six written 16 MiB arrays and frees them, eight times, and prints
# the minor page faults of those rounds, first with glibc's own malloc
# settings, then after keep_freed_memory(). keras_lcmae/cpu.py is loaded as a
# file (no Keras import), as tools/benchmark.py loads it. Transparent huge
# pages are turned off for the process (and NumPy's hint for them), so a
# fault is a 4 KiB page wherever the kernel's THP setting is "always".
FAULTS = r"""
import ctypes, importlib.util, json, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
import numpy as np
spec = importlib.util.spec_from_file_location("cpu", sys.argv[1])
cpu = importlib.util.module_from_spec(spec); spec.loader.exec_module(cpu)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        arrays = [np.ones(4 << 20, np.float32) for _ in range(6)]
        del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
applied = cpu.keep_freed_memory()
faults()
print(json.dumps({"default": default, "tuned": faults(), "applied": applied, "keras": "keras" in sys.modules}))
"""


@pytest.mark.skipif(bool(os.environ.get("LD_PRELOAD")), reason="another allocator may be preloaded over glibc's")
def test_keep_freed_memory_stops_the_page_faults_of_reallocation():
    import json

    out = subprocess.run(
        [sys.executable, "-c", FAULTS, os.path.join(ROOT, "keras_lcmae", "cpu.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, NUMPY_MADVISE_HUGEPAGE="0"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["keras"] is False
    if got["applied"] is None:
        pytest.skip("malloc is not glibc's: keep_freed_memory changes nothing there")
    assert got["applied"] == {"mmap_threshold": 32 << 20, "trim_threshold": 2**31 - 1, "top_pad": 64 << 20}
    # glibc's own settings hand the freed 96 MiB back and fault it in again each round (24 576 pages)
    assert got["default"] > 8 * 1000, got
    assert got["tuned"] < got["default"] / 50, got


def test_keep_freed_memory_names_a_setting_out_of_range():
    from keras_lcmae.cpu import MMAP_THRESHOLD_MAX, keep_freed_memory

    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=MMAP_THRESHOLD_MAX + 1)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=-1)


X86_AVX2 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n"
)
X86_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_fp16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd asimdhp bf16 i8mm\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


def _cpuinfo(tmp_path, text, name="cpuinfo"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cpu_flags_read_x86_flags_and_arm_features(tmp_path):
    from keras_lcmae.cpu import cpu_flags

    assert cpu_flags(_cpuinfo(tmp_path, X86_AVX2)) == {"fpu", "sse2", "avx", "fma", "avx2"}  # the first processor's
    assert cpu_flags(_cpuinfo(tmp_path, ARM_BF16)) == {"fp", "asimd", "asimdhp", "bf16", "i8mm"}
    assert cpu_flags(_cpuinfo(tmp_path, "processor\t: 0\n")) is None
    assert cpu_flags(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "text,bf16,fp16",
    [
        (X86_AVX2, False, False),
        (X86_BF16, True, False),
        (X86_AMX, True, True),
        (ARM_BF16, True, True),
        (ARM_OLD, False, False),
    ],
)
def test_native_cpu_dtype_follows_the_flags(tmp_path, text, bf16, fp16):
    from keras_lcmae.cpu import native_cpu_dtype

    path = _cpuinfo(tmp_path, text)
    assert native_cpu_dtype("bfloat16", path) is bf16
    assert native_cpu_dtype("float16", path) is fp16
    assert native_cpu_dtype("float32", path) is True
    assert native_cpu_dtype("bfloat16", str(tmp_path / "missing")) is None


def test_cpu_precision_warning_only_for_16_bit_compute_on_a_cpu_without_it(tmp_path):
    from keras_lcmae.cpu import cpu_precision_warning

    avx2, bf16, amx = (
        _cpuinfo(tmp_path, text, name) for name, text in (("a", X86_AVX2), ("b", X86_BF16), ("c", X86_AMX))
    )
    message = cpu_precision_warning("mixed_bfloat16", avx2, on_cpu=True)
    assert "'mixed_bfloat16'" in message and "avx512_bf16 or amx_bf16" in message and "float32" in message
    assert "'mixed_float16'" in cpu_precision_warning(keras.dtype_policies.get("mixed_float16"), bf16, on_cpu=True)
    assert cpu_precision_warning("mixed_bfloat16", bf16, on_cpu=True) is None
    assert cpu_precision_warning("mixed_float16", amx, on_cpu=True) is None
    assert cpu_precision_warning("mixed_bfloat16", avx2, on_cpu=False) is None  # a GPU computes
    assert cpu_precision_warning("float32", avx2, on_cpu=True) is None
    assert cpu_precision_warning("mixed_bfloat16", str(tmp_path / "missing"), on_cpu=True) is None  # unknown CPU


def test_backend_on_cpu_agrees_with_where_the_backend_puts_a_tensor():
    from keras_lcmae.cpu import backend_on_cpu

    x = keras.ops.zeros((1,))
    if BACKEND == "torch":
        place = x.device.type
    elif BACKEND == "jax":
        place = next(iter(x.devices())).platform
    else:
        place = x.device.split(":")[-2].lower()  # /job:localhost/replica:0/task:0/device:CPU:0
    assert backend_on_cpu() == (place == "cpu"), place
