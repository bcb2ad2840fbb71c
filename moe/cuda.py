"""The CUDA backend's Python side (NOT YET RUN ON A GPU: compiled and loaded here, but this
development machine has no GPU; see the CUDA issue).

moe.cuda.route runs the fused router kernel on CUDA tensors in place: logits from PyTorch
(float32 / bfloat16 / float16) or any producer of __cuda_array_interface__ (CuPy, Numba;
float32 / float16), outputs allocated by the same library on the same device, and the work
queued on the given stream (default: the producer's current stream for PyTorch, else the
legacy default stream).
"""
from __future__ import annotations

from . import _C
from ._api import check_int, check_routing_options

__all__ = ["route"]

_DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2}


def _torch_info(t):
    import torch

    if not t.is_cuda:
        raise ValueError("logits must be a CUDA tensor for moe.cuda.route")
    name = str(t.dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {t.dtype}")
    t = t.contiguous()
    return t, t.data_ptr(), _DTYPES[name], torch.cuda.current_stream(t.device).cuda_stream


def route(logits, top_k, *, scoring="softmax", renormalize=True, routed_scaling=1.0,
          expert_bias=None, n_groups=1, topk_groups=1, stream=None):
    """Fused routing on the GPU: logits (T, E) CUDA tensor -> (expert_ids (T, k) int32,
    weights (T, k) float32), same options and tie rule as moe.route (dropless; E <= 1024,
    top_k <= 32).  Scores in float32 (moe.route uses float64), so near-ties may differ."""
    import torch

    if not isinstance(logits, torch.Tensor):
        raise TypeError("moe.cuda.route takes a torch CUDA tensor (CuPy: torch.as_tensor)")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (n_tokens, n_experts), got {tuple(logits.shape)}")
    T, E = logits.shape
    top_k, code, n_groups, topk_groups, routed_scaling, _ = check_routing_options(
        E, top_k, scoring, n_groups, topk_groups, routed_scaling, None)
    if E > 1024 or top_k > 32:
        raise ValueError(f"the CUDA router takes n_experts <= 1024 and top_k <= 32, got "
                         f"{E} and {top_k}")
    logits, ptr, dtype, cur = _torch_info(logits)
    bias_ptr = 0
    if expert_bias is not None:
        expert_bias = torch.as_tensor(expert_bias, dtype=torch.float32,
                                      device=logits.device).contiguous()
        if expert_bias.shape != (E,):
            raise ValueError(f"expert_bias must have shape (n_experts={E},), got "
                             f"{tuple(expert_bias.shape)}")
        bias_ptr = expert_bias.data_ptr()
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    w = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    s = cur if stream is None else int(getattr(stream, "cuda_stream", stream))
    _C.cuda_route(ptr, dtype=dtype, n_tokens=check_int(T, "n_tokens", 0), n_experts=E,
                  top_k=top_k, scoring=code, renormalize=int(bool(renormalize)),
                  expert_ids=ids.data_ptr(), weights=w.data_ptr(), stream=s,
                  expert_bias=bias_ptr, n_groups=n_groups, topk_groups=topk_groups,
                  routed_scaling=float(routed_scaling))
    return ids, w

