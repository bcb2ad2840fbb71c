"""Fuzz target for moe.safetensors (atheris): random and mutated files through the reader.

Inputs are whole files (the seed corpus is valid files).  Opening and reading every tensor
may succeed or raise SafetensorsError; any other exception, a crash, or an out-of-bounds
read is a finding.  Run: python tests/fuzz/fuzz_safetensors.py CORPUS_DIR -max_total_time=60
Replay one input: python tests/fuzz/fuzz_safetensors.py CRASH_FILE
"""
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["moe"]):
    import numpy as np
    from moe import safetensors

PATH = os.path.join(tempfile.mkdtemp(prefix="moe-fuzz-"), "f.safetensors")


def check(data):
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        with safetensors.safe_open(PATH) as st:
            for name in st.keys():
                a = st.get(name)
                np.asarray(a).sum()  # touch every byte the view claims to cover
                st.dtype(name), st.shape(name)
            st.metadata()
    except safetensors.SafetensorsError:
        pass


def test_one_input(data):
    check(data)


def write_seeds(directory):
    """A few valid files to start from."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    seeds = {
        "empty": {},
        "small": {"a": rng.standard_normal((2, 3)).astype(np.float32),
                  "b": np.arange(5, dtype=np.int64)},
        "mixed": {"w": rng.standard_normal(4).astype(np.float16),
                  "z": np.zeros((0, 3), np.float32), "u": np.arange(3, dtype=np.uint8)},
    }
    for name, tensors in seeds.items():
        safetensors.save_file(tensors, os.path.join(directory, name + ".safetensors"),
                              metadata={"format": "pt"} if name == "small" else None)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--seeds":
        write_seeds(sys.argv[2])
        sys.exit(0)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
