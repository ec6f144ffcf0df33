"""MirroredStrategy on 2 logical CPU devices gives the same loss and the same
update as one device, for the same weights, images and noise."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.tf_only, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("method", ["mae", "lcmae"])
def test_mirrored_matches_one_device(method):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "scripts", "mirrored_step.py"), method],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["loss_mirrored"] == pytest.approx(r["loss_single"], rel=1e-5)
    assert r["loss_mae_mirrored"] == pytest.approx(r["loss_mae_single"], rel=1e-5)
    assert r["max_update"] > 1e-2  # the step did change the weights
    assert r["max_weight_diff"] < 1e-5
