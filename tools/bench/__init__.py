"""The parts of ``tools/benchmark.py``, one concern a module.

- :mod:`bench.plan`: the configs, the methods, the suites and the worker jobs
  of a section (which processes run what);
- :mod:`bench.flops`: the model FLOPs of a training step and the rates a
  record's step times give (images/s, TFLOP/s, MFU);
- :mod:`bench.gpus`: the GPUs' peak TFLOP/s (the MFU's denominator);
- :mod:`bench.machine`: the device, its memory and the host's CPU and malloc,
  read without importing Keras;
- :mod:`bench.workers`: what one worker process times (our models, the
  optimizer update, the input pipeline, transformers' ViTMAE) and the
  spawning of such a process;
- :mod:`bench.report`: pooling of rounds, the ratios, and the markdown report.

``tools/benchmark.py`` is the command line over them.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARK_SCRIPT = os.path.join(ROOT, "tools", "benchmark.py")
