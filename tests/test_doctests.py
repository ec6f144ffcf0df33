"""The ``>>>`` examples in the docstrings of ``keras_lcmae`` run, under every
backend.

Each module's examples run in that module's own namespace, as
``python -m doctest`` and ``pytest --doctest-modules`` run them: an example
may use what its module defines or imports and what the example imports
itself, nothing else, so it can be pasted as it stands. Options: ``ELLIPSIS``
and ``NORMALIZE_WHITESPACE``. Before each docstring the Keras session is
cleared and the seed set, so layer names (``vit_encoder/...``) are those of a
fresh process. Expected outputs must hold on TensorFlow, JAX and PyTorch:
shapes as ``tuple(x.shape)``, floats rounded, no printed tensors.
"""

import doctest
import importlib
import inspect
import pkgutil
import warnings

import keras
import pytest

import keras_lcmae

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

MODULES = ["keras_lcmae"] + sorted(m.name for m in pkgutil.walk_packages(keras_lcmae.__path__, "keras_lcmae."))

# The fewest examples (``>>>`` statements that run: ``+SKIP`` ones do not
# count) each module must hold, so that deleting or disabling examples fails
# here; raise a floor when you add examples. A new module needs an entry (0
# if it has no public API to show).
EXAMPLE_FLOORS = {
    "keras_lcmae": 0,
    "keras_lcmae.analysis": 6,
    "keras_lcmae.analysis.extract": 9,
    "keras_lcmae.analysis.inputs": 0,  # files and checkpoints on disk; tools/analyze.py
    "keras_lcmae.analysis.metrics": 11,
    "keras_lcmae.analysis.plots": 0,  # matplotlib figures
    "keras_lcmae.backend": 1,
    "keras_lcmae.backend.blocks": 0,  # speed paths: tests/test_backend.py compares each with the plain path
    "keras_lcmae.backend.keras_internals": 0,  # hooks of Keras' classes: tests/test_backend.py
    "keras_lcmae.backend.torch_optim": 0,  # PyTorch kernels: tests/test_backend.py
    "keras_lcmae.backend.keras_callbacks": 0,  # hooks of Keras' BackupAndRestore: tests/test_callbacks_robust.py
    "keras_lcmae.callbacks": 0,  # re-exports its modules' names
    "keras_lcmae.callbacks._values": 0,
    "keras_lcmae.callbacks.backup": 22,
    "keras_lcmae.callbacks.checkpoints": 11,
    "keras_lcmae.callbacks.defaults": 3,
    "keras_lcmae.callbacks.logs": 10,
    "keras_lcmae.callbacks.monitors": 0,  # need a trained encoder and labelled splits; tests/test_evaluation.py
    "keras_lcmae.callbacks.schedules": 5,
    "keras_lcmae.classifier": 24,
    "keras_lcmae.clustering": 19,
    "keras_lcmae.convert": 0,  # re-exports its modules' names
    "keras_lcmae.convert.files": 4,
    "keras_lcmae.convert.hf": 0,  # needs transformers to write a folder: tests/test_reference.py
    "keras_lcmae.convert.hub": 0,  # needs keras-hub: tests/test_convert.py
    "keras_lcmae.convert.official": 5,
    "keras_lcmae.cpu": 0,  # reads the host's CPU flags: nothing portable to show
    "keras_lcmae.data": 0,  # re-exports its modules' names
    "keras_lcmae.data.augment": 0,  # random crops and mixes; tests/test_data.py
    "keras_lcmae.data.fashion_mnist": 4,
    "keras_lcmae.data.folders": 7,
    "keras_lcmae.data.pipelines": 11,
    "keras_lcmae.data.skipped": 0,
    "keras_lcmae.data.sources": 2,
    "keras_lcmae.data.tfrecords": 0,  # TFRecord files on disk; tests/test_data_preflight.py
    "keras_lcmae.decoders": 15,
    "keras_lcmae.distribute": 1,
    "keras_lcmae.encoder": 8,
    "keras_lcmae.errors": 1,
    "keras_lcmae.evaluation": 15,
    "keras_lcmae.layers": 10,
    "keras_lcmae.losses": 26,
    "keras_lcmae.masking": 23,
    "keras_lcmae.memory": 0,  # re-exports its modules' names
    "keras_lcmae.memory.estimate": 4,
    "keras_lcmae.memory.geometry": 2,
    "keras_lcmae.memory.measure": 0,  # reads this process's resident memory
    "keras_lcmae.memory.report": 0,
    "keras_lcmae.models": 0,  # the package re-exports; examples live in its modules
    "keras_lcmae.models.autoencoder": 9,
    "keras_lcmae.models.base": 6,
    "keras_lcmae.models.lcmae": 8,
    "keras_lcmae.models.mae": 8,
    "keras_lcmae.ops": 9,
    "keras_lcmae.optim": 35,
    "keras_lcmae.training": 15,
}


def docstring_tests(module_name):
    """The doctests of one module (its own objects only), by name."""
    module = importlib.import_module(module_name)
    return [test for test in doctest.DocTestFinder().find(module) if test.examples]


def count_examples(tests):
    """The examples of ``tests`` that run (not marked ``+SKIP``)."""
    return sum(not example.options.get(doctest.SKIP) for test in tests for example in test.examples)


def _reset_keras():
    if "free_memory" in inspect.signature(keras.utils.clear_session).parameters:
        keras.utils.clear_session(free_memory=False)  # a gc.collect() per docstring costs 0.3 s
    else:
        keras.utils.clear_session()
    keras.utils.set_random_seed(0)


@pytest.fixture(autouse=True)
def _fresh_session():
    """Replaces conftest's fixture of this name (a ``clear_session`` with a
    garbage collection per test, 0.3 s each): :func:`run_examples` resets
    Keras before every docstring itself."""
    yield


def run_examples(tests):
    """Runs ``tests``; returns ``(failed, attempted, report)``, the report
    being doctest's own account of each failure."""
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = []
    failed = attempted = 0
    with warnings.catch_warnings():
        # examples that show a recovery (a diverged run, a damaged backup) warn on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        for test in tests:
            _reset_keras()
            result = runner.run(test, out=report.append)
            failed += result.failed
            attempted += result.attempted
    return failed, attempted, "".join(report)


def test_every_module_has_a_floor():
    assert sorted(EXAMPLE_FLOORS) == MODULES


def test_total_number_of_examples():
    total = sum(count_examples(docstring_tests(name)) for name in MODULES)
    assert total >= sum(EXAMPLE_FLOORS.values()), f"only {total} docstring examples left"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    tests = docstring_tests(module_name)
    count = count_examples(tests)
    floor = EXAMPLE_FLOORS.get(module_name, 0)
    assert count >= floor, f"{module_name} has {count} docstring examples, fewer than its floor {floor}"
    failed, attempted, report = run_examples(tests)
    assert attempted == count
    assert failed == 0, f"{failed} of {attempted} examples of {module_name} failed:\n{report}"


BROKEN = """
>>> import numpy as np
>>> undefined_name + 1
2
>>> tuple(np.zeros((2, 3)).shape)
(3, 2)
>>> 1 + 1
2
>>> 1 / 0  # doctest: +SKIP
"""


def test_a_broken_example_fails():
    """The harness reports a missing name and a wrong output as failures,
    and a skipped example does not count."""
    test = doctest.DocTestParser().get_doctest(BROKEN, {}, "broken", None, 0)
    assert (len(test.examples), count_examples([test])) == (5, 4)
    failed, attempted, report = run_examples([test])
    assert (failed, attempted) == (2, 4)
    assert "NameError: name 'undefined_name' is not defined" in report
    assert "Expected:\n    (3, 2)\nGot:\n    (2, 3)" in report
