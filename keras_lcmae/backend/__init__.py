"""Per-backend speed paths and every use of a private Keras, TensorFlow, JAX
or PyTorch API, behind one switch.

The rest of the library is written with public ``keras`` APIs and reads as
the method; where one backend has a faster way to compute the same result,
or where only a private hook of Keras gives a behaviour, the code lives here:

- :mod:`keras_lcmae.backend.blocks`: the Transformer blocks' speed paths:
  explicit attention for PyTorch's 16-bit CPU kernels, a float32-wide GELU
  with its own gradient for TensorFlow in 16 bits, and a gradient fusion
  break for XLA:CPU under JAX.
- :mod:`keras_lcmae.backend.torch_optim`: PyTorch's fused and foreach AdamW
  kernels (``torch._fused_adamw_``, ``torch._foreach_*``) for the
  optimizers' updates and gradient accumulation.
- :mod:`keras_lcmae.backend.keras_internals`: mixins that override Keras'
  private optimizer, model and callback hooks (gradient accumulation, the
  fused updates, decay rules, freeing PyTorch gradients early, the
  multi-worker ``fit`` fixes, ``ModelCheckpoint``'s save hook).

**The switch.** :func:`use_fast_paths` says whether the speed paths run
(default: yes). The environment variable ``KERAS_LCMAE_FAST_PATHS=0`` (or
``false``/``no``/``off``) turns every one of them off for a process;
:func:`set_fast_paths` and the :func:`fast_paths` context manager set it in
code (they take precedence over the variable). When off, each speed path
gives way to the plain Keras computation it replaces, which gives the same
numbers up to floating-point rounding (``tests/test_backend.py`` checks each
pair). The hooks that give a *behaviour* (gradient accumulation's update
count, decay rules) are not speed paths and always run.

Example:
>>> from keras_lcmae import backend
>>> with backend.fast_paths(False):
...     backend.use_fast_paths()
False
"""

import contextlib
import os

ENV_VAR = "KERAS_LCMAE_FAST_PATHS"
_OFF = ("0", "false", "no", "off")
_override = None  # set in code: True/False; None defers to the environment


def _from_env():
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def use_fast_paths():
    """Whether the per-backend speed paths run: the value given to
    :func:`set_fast_paths` (or :func:`fast_paths`) if any, else on unless
    ``KERAS_LCMAE_FAST_PATHS`` is ``0``/``false``/``no``/``off``."""
    return _from_env() if _override is None else _override


def set_fast_paths(enabled):
    """Turns every speed path on (``True``) or off (``False``) for this
    process; ``None`` goes back to the environment variable. Returns the
    previous setting (``True``, ``False`` or ``None``)."""
    global _override
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"`enabled` must be True, False or None, got {enabled!r}.")
    previous, _override = _override, enabled
    return previous


@contextlib.contextmanager
def fast_paths(enabled):
    """Runs a block with the speed paths on or off (see :func:`set_fast_paths`),
    restoring the previous setting after it."""
    previous = set_fast_paths(enabled)
    try:
        yield
    finally:
        set_fast_paths(previous)


def tf():
    """The ``tensorflow`` module, imported on first use: only the TensorFlow
    code paths need it, and importing it costs seconds on other backends."""
    import tensorflow

    return tensorflow


__all__ = ["ENV_VAR", "fast_paths", "set_fast_paths", "tf", "use_fast_paths"]
