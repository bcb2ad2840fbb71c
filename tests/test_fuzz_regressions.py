"""Replays every input the fuzzers ever kept (tests/fuzz/regressions/<target>/): each must
now be handled (succeed or raise a documented exception).  The fuzz targets themselves run
in CI (.ci/fuzz.sh); this keeps their findings fixed without atheris installed."""
import os

import numpy as np
import pytest

import moe
from moe import safetensors

HERE = os.path.join(os.path.dirname(__file__), "fuzz", "regressions")


def inputs(target):
    d = os.path.join(HERE, target)
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


@pytest.mark.parametrize("path", inputs("safetensors") or [None])
def test_safetensors_regressions(path, tmp_path):
    if path is None:
        pytest.skip("no safetensors regression inputs kept yet")
    data = open(path, "rb").read()
    f = tmp_path / "x.safetensors"
    f.write_bytes(data)
    try:
        with safetensors.safe_open(str(f)) as st:
            for name in st.keys():
                np.asarray(st.get(name)).sum()
    except safetensors.SafetensorsError:
        pass


def test_api_regressions_replay_in_a_child(tmp_path):
    """The api fuzz target needs atheris to decode its inputs; replay them when present."""
    files = inputs("api")
    if not files:
        pytest.skip("no api regression inputs kept yet")
    pytest.importorskip("atheris")
    import subprocess
    import sys
    target = os.path.join(os.path.dirname(__file__), "fuzz", "fuzz_api.py")
    for path in files:
        proc = subprocess.run([sys.executable, target, path], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{path}: {proc.stderr[-2000:]}"
    assert moe.get_num_threads() >= 1
