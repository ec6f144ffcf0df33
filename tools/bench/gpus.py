"""Peak TFLOP/s of the GPUs: the denominator of the model-FLOP utilisation."""

import re

# Dense (no sparsity) bf16 tensor-core peak of GPUs, TFLOP/s, from NVIDIA's
# data sheets; the first pattern found in the device name wins. A device not
# listed gets no MFU unless --peak_tflops gives its peak.
GPU_PEAK_BF16_TFLOPS = (
    (r"H200 NVL", 835.5),
    (r"H200", 989.4),  # H200 SXM, GH200
    (r"H100 PCIe", 756.0),
    (r"H100 NVL", 835.5),
    (r"H100", 989.4),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    (r"A100", 312.0),
    (r"L40S", 362.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_tflops_for(device, dtype, override=None):
    """The device's peak TFLOP/s for ``dtype`` training: ``override`` when
    given; for bfloat16 on a GPU of :data:`GPU_PEAK_BF16_TFLOPS` its dense
    bf16 peak; otherwise None (float32 peaks depend on TF32 settings, and a
    CPU's on its vector units: pass ``--peak_tflops``)."""
    if override:
        return float(override)
    if dtype != "bfloat16" or not device.startswith("gpu:"):
        return None
    for pattern, peak in GPU_PEAK_BF16_TFLOPS:
        if re.search(pattern, device):
            return peak
    return None
