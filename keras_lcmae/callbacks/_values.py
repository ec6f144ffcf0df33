"""Numbers read out of a model or a ``logs`` dict, shared by the callbacks."""

import keras
import numpy as np


def _iterations(model):
    """The optimizer's update count (under JAX, reading ``self.model`` in a
    callback first syncs the training state onto the variables)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _as_float(value):
    """A scalar numeric log entry as a float; ``None`` for anything else."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # an odd log entry is simply not numeric
        return None
    if array.size != 1 or array.dtype.kind not in "iuf":
        return None
    return float(array.reshape(()))


def _first_nonfinite(variables):
    """The path of the first float variable holding a NaN or an infinity, or
    ``None``. One reduction per variable on the device, one transfer."""
    floats = [v for v in variables if "float" in str(v.dtype)]
    if not floats:
        return None
    flags = keras.ops.stack([keras.ops.all(keras.ops.isfinite(v.value)) for v in floats])
    for variable, ok in zip(floats, keras.ops.convert_to_numpy(flags)):
        if not ok:
            return getattr(variable, "path", None) or variable.name
    return None
