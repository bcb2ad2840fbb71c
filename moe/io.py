"""Save and load a SparseMoE as one safetensors file: the weights as tensors and the
layer's configuration as JSON in the file's metadata.  A round trip is bitwise: float32,
float16 and bfloat16 (bits) weights are stored as they are."""
from __future__ import annotations

import json

import numpy as np

from . import safetensors
from .layer import _WEIGHTS, SparseMoE

FORMAT = "moe.SparseMoE/1"
_FFN = ("w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down")


def save(layer: SparseMoE, path) -> None:
    """Write `layer` to `path` (a .safetensors file); see moe.load."""
    tensors, dtypes = {}, {}
    for name in _WEIGHTS:
        value = getattr(layer, name)
        if value is None:
            continue
        tensors[name] = np.asarray(value)
        if name in _FFN and layer.dtype == "bfloat16":
            dtypes[name] = "BF16"
    metadata = {"format": FORMAT, "config": json.dumps(layer.config(), sort_keys=True)}
    safetensors.save_file(tensors, path, metadata=metadata, dtypes=dtypes)


def load(path) -> SparseMoE:
    """Read a layer written by SparseMoE.save / moe.save; raises ValueError for a file that
    is not one (moe.safetensors.SafetensorsError for a malformed file)."""
    with safetensors.safe_open(path) as f:
        meta = f.metadata()
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{path}: not a moe layer file (metadata format is "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        try:
            config = json.loads(meta["config"])
        except ValueError as exc:
            raise ValueError(f"{path}: the layer config in the metadata is not JSON: {exc}")
        layer = SparseMoE(**config, init=False)
        for name in f.keys():
            if name not in _WEIGHTS:
                raise ValueError(f"{path}: unknown tensor {name!r}")
            # copy out of the memory map: the layer owns its weights
            setattr(layer, name, np.array(f.get(name)))
    return layer
