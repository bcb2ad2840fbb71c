"""moe: sparse Mixture-of-Experts layers with a C core.

Routing (softmax / sigmoid scores, top-k, renormalisation, selection bias, group-limited
top-k, capacity; expert choice, top-p / threshold dynamic k, expert skipping), dispatch and combine, grouped expert FFNs and a whole layer,
on NumPy arrays or CPU DLPack tensors.  ``moe.reference`` is the float64 oracle.
"""
try:
    from . import _C  # noqa: F401
except ImportError as exc:  # a source tree without its built extension
    raise ImportError(
        f"moe's C extension is not built next to {__file__}: install with "
        "`pip install -e .` to use this source tree, or run Python from another directory "
        f"so it finds the installed package ({exc})"
    ) from exc
from . import reference
from ._api import (ACTIVATIONS, SCORINGS, WEIGHT_DTYPES, Dispatch, PackedExperts, RoutingResult,
                   bfloat16_to_float32, combine, cuda_available, dispatch, expert_ffn, ffn,
                   float32_to_bfloat16, get_num_threads, pack_experts, route, set_num_threads,
                   show_config, update_expert_bias)
from .routing import (DynamicRoutingResult, ExpertChoiceResult, SkipResult,
                      route_expert_choice, route_threshold, route_top_p, skip_experts)
from .layer import NullRoutingResult, SparseMoE, prune_experts
from .train import (SparseRows, TrainContext, combine_backward, dispatch_backward,
                    expert_ffn_backward, ffn_backward, route_backward)
from .multihead import MultiHeadMoE
from . import cuda
from .lora import (FlyLoRA, GatedLoRA, HydraLoRA, MultiLoRA, SMoRA, SoftLoRA, TopKLoRA,
                   sparse_projection)
from .peer import PEER, PEERRouting
from . import safetensors
from .hf import from_hf
from .io import load, save
from .quant import QUANT_DTYPES, QuantizedWeight, quantize
COMPUTE_DTYPES = _C.COMPUTE_DTYPES
from .stats import RoutingStats, routing_stats
from .upcycle import upcycle
from .soft_moe import MixtureOfTokens, SoftMoE

__version__ = "0.1.0"

__all__ = ["SparseMoE", "quantize", "QuantizedWeight", "QUANT_DTYPES", "COMPUTE_DTYPES", "route", "update_expert_bias", "dispatch", "combine", "expert_ffn",
           "ffn", "pack_experts", "PackedExperts", "set_num_threads", "get_num_threads",
           "float32_to_bfloat16", "bfloat16_to_float32", "RoutingResult", "Dispatch",
           "show_config", "cuda_available", "reference", "SCORINGS", "ACTIVATIONS",
           "WEIGHT_DTYPES", "from_hf", "load", "save", "safetensors", "upcycle", "RoutingStats",
           "routing_stats", "route_expert_choice", "route_top_p", "route_threshold",
           "skip_experts", "ExpertChoiceResult", "DynamicRoutingResult", "SkipResult",
           "TopKLoRA", "SoftLoRA", "GatedLoRA", "HydraLoRA", "FlyLoRA", "SMoRA", "MultiLoRA",
           "sparse_projection", "NullRoutingResult", "prune_experts", "MultiHeadMoE", "SoftMoE",
           "MixtureOfTokens", "PEER", "PEERRouting", "SparseRows", "TrainContext",
           "route_backward", "combine_backward", "dispatch_backward", "expert_ffn_backward", "ffn_backward",
           "__version__"]
