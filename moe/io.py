"""Save and load a layer as one safetensors file: the weights as tensors and the layer's
class and configuration as JSON in the file's metadata.  A round trip is bitwise: float32,
float16 and bfloat16 (bits) weights are stored as they are, quantized ones (moe.quant) as
their values and scales (tensors `name` and `name.scales`).

Layers: SparseMoE, SoftMoE, MixtureOfTokens, PEER and the LoRA layers of moe.lora.
"""
from __future__ import annotations

import json

import numpy as np

from . import safetensors
from ._api import LAYER_CLASSES
from .quant import QuantizedWeight

FORMAT = "moe.layer/2"
_SCALES = ".scales"  # a quantized weight `w` is stored as tensors `w` and `w.scales`
_FORMAT_V1 = "moe.SparseMoE/1"  # SparseMoE files of the first format still load


def _classes():
    """The layer classes (moe._api.saveable): this module imports none of them, so the
    layer modules may import it."""
    return LAYER_CLASSES


def _weight_names(layer):
    return layer._weight_names()


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a layer config")


def save(layer, path) -> None:
    """Write `layer` to `path` (a .safetensors file); see moe.load."""
    name = type(layer).__name__
    if _classes().get(name) is not type(layer):
        raise TypeError(f"moe.save takes {', '.join(sorted(_classes()))}; got {name}")
    tensors, dtypes = {}, {}
    for key in _weight_names(layer):
        value = getattr(layer, key)
        if value is None:
            continue
        if isinstance(value, QuantizedWeight):  # two tensors
            tensors[key], tensors[key + _SCALES] = value.values, value.scales
            continue
        tensors[key] = np.asarray(value)
        if tensors[key].dtype == np.uint16:  # only bfloat16 weights are stored as bits
            dtypes[key] = "BF16"
    metadata = {"format": FORMAT, "class": name,
                "config": json.dumps(layer.config(), sort_keys=True, default=_json_default)}
    safetensors.save_file(tensors, path, metadata=metadata, dtypes=dtypes)


def load(path):
    """Read a layer written by layer.save / moe.save; raises ValueError for a file that is
    not one (moe.safetensors.SafetensorsError for a malformed file)."""
    with safetensors.safe_open(path) as f:
        meta = f.metadata()
        fmt = meta.get("format")
        if fmt not in (FORMAT, _FORMAT_V1) or "config" not in meta:
            raise ValueError(f"{path}: not a moe layer file (metadata format is "
                             f"{fmt!r}, expected {FORMAT!r})")
        name = "SparseMoE" if fmt == _FORMAT_V1 else meta.get("class")
        cls = _classes().get(name)
        if cls is None:
            raise ValueError(f"{path}: unknown layer class {name!r}")
        try:
            config = json.loads(meta["config"])
        except ValueError as exc:
            raise ValueError(f"{path}: the layer config in the metadata is not JSON: {exc}")
        if not isinstance(config, dict):
            raise ValueError(f"{path}: the layer config in the metadata must be a JSON object "
                             f"(the layer's arguments), got {type(config).__name__}")
        layer = cls(**config, init=False)
        names = set(_weight_names(layer))
        keys = set(f.keys())
        for key in sorted(keys):
            if key.endswith(_SCALES):
                if key[:-len(_SCALES)] not in keys:
                    raise ValueError(f"{path}: {key!r} without its weight "
                                     f"{key[:-len(_SCALES)]!r}")
                continue
            if key not in names:
                raise ValueError(f"{path}: unknown tensor {key!r}")
            # copy out of the memory map: the layer owns its weights
            value = np.array(f.get(key))
            if key + _SCALES in keys:  # quantized: (values, scales)
                value = (value, np.array(f.get(key + _SCALES)))
            setattr(layer, key, value)
    return layer
