"""Type stubs for moe._C, the C extension (use the moe package, not this module).

Every array argument must already be a C-contiguous ndarray of the exact dtype noted;
moe/_api.py converts user input before calling these.  Every function but layer_forward
takes keywords (moe/ passes all but the first argument by keyword); options after `*` are
keyword-only and default to "absent".
"""
from typing import Any, Dict, Optional, Tuple

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

def router_logits(x: F32, router_weight: F32) -> F64: ...
def route(logits: F64, top_k: int, scoring: int, renormalize: bool, *,
          routed_scaling: float = 1.0, expert_bias: Optional[F32] = None, n_groups: int = 1,
          topk_groups: int = 1, capacity_factor: float = 0.0,
          allowed: Optional[npt.NDArray[np.bool_]] = None,
          groups: Optional[I32] = None) -> Tuple[I32, F32, I64, int, float, float]: ...
def route_expert_choice(logits: F64, capacity: int,
                        scoring: int) -> Tuple[I64, F32, I32, I32, F32]: ...
def route_dynamic(logits: F64, mode: int, p: float, k_min: int, k_max: int,
                  renormalize: bool) -> Tuple[I32, F32, I32]: ...
def route_skip(expert_ids: I32, weights: F32, threshold: float, renormalize: bool) -> int: ...
def update_expert_bias(bias: F64, counts: I64, rate: float) -> None: ...
def dispatch(x: F32, expert_ids: I32, n_experts: int) -> Tuple[F32, I64, I64, I64]: ...
def combine(y: F32, position: I64, weights: F32) -> F32: ...
Packed = Any  # a capsule holding moe_experts

def pack_experts(w_gate: Optional[npt.NDArray[Any]], w_up: npt.NDArray[Any],
                 w_down: npt.NDArray[Any], dtype: int, *, b_gate: Optional[F32] = None,
                 b_up: Optional[F32] = None, b_down: Optional[F32] = None,
                 expert_d_ff: Optional[I64] = None, compute: int = 0,
                 w_gate_scales: Optional[npt.NDArray[Any]] = None,
                 w_up_scales: Optional[npt.NDArray[Any]] = None,
                 w_down_scales: Optional[npt.NDArray[Any]] = None,
                 group_size: int = 0) -> Packed: ...
def experts_info(packed: Packed) -> Dict[str, int]: ...
def ffn_grouped(x: F32, token_index: Optional[I64], offsets: I64, experts: Packed,
                activation: int, *, alpha: float = 1.702, limit: float = 7.0,
                lora: Optional[Any] = None) -> F32: ...
def layer_forward(x: F32, router_weight: F32, experts: Packed, top_k: int, activation: int,
                  *, expert_bias: Optional[F32] = None, scoring: int = 0,
                  renormalize: bool = True, routed_scaling: float = 1.0, n_groups: int = 1,
                  topk_groups: int = 1, capacity_factor: float = 0.0,
                  shared_experts: Optional[Packed] = None,
                  shared_gate_weight: Optional[F32] = None,
                  router_bias: Optional[F32] = None, alpha: float = 1.702,
                  limit: float = 7.0, lora: Optional[Any] = None,
                  null_kinds: Optional[I32] = None, null_values: Optional[F32] = None,
                  allowed: Optional[npt.NDArray[np.bool_]] = None,
                  groups: Optional[I32] = None, want_out_norm: bool = False,
                  router: int = 0, router_p: float = 0.0, k_min: int = 1,
                  skip_threshold: float = 0.0, skip_renormalize: bool = False,
                  save: bool = False, save_hidden: bool = False
                  ) -> Tuple[F32, I32, F32, I64, int, float, float, Optional[I32],
                             Optional[F64],
                             Optional[Tuple[F64, F32, Optional[F32], Optional[F32]]]]: ...
# the backward of a forward takes that forward's own (args, kwargs)
def layer_backward(forward_args: Tuple[Any, ...], forward_kwargs: Dict[str, Any],
                   expert_ids: I32, weights: F32, logits: F64, y: F32, shared: Optional[F32],
                   dy: F32, *, w_gate: Optional[npt.NDArray[Any]] = None,
                   w_up: Optional[npt.NDArray[Any]] = None,
                   w_down: Optional[npt.NDArray[Any]] = None,
                   shared_w_gate: Optional[npt.NDArray[Any]] = None,
                   shared_w_up: Optional[npt.NDArray[Any]] = None,
                   shared_w_down: Optional[npt.NDArray[Any]] = None, aux_coef: float = 0.0,
                   z_coef: float = 0.0, biases: bool = False,
                   lora_weights: Optional[Tuple[Optional[F32], ...]] = None,
                   lora_rank: int = 0, lora_scaling: float = 1.0, frozen: bool = False,
                   router_grad: int = 0, hidden: Optional[F32] = None
                   ) -> Dict[str, Optional[F32]]: ...
def route_backward(route_args: Tuple[Any, ...], route_kwargs: Dict[str, Any], expert_ids: I32,
                   d_weights: F32, *, aux_coef: float = 0.0, z_coef: float = 0.0,
                   router_grad: int = 0) -> F64: ...
def combine_backward(y: F32, position: I64, weights: F32, d_out: F32) -> Tuple[F32, F32]: ...
def dispatch_backward(d_rows: F32, position: I64) -> F32: ...
def linear_backward(x: F32, w: npt.NDArray[Any], dy: F32, dtype: int) -> Tuple[F32, F32]: ...
def router_backward(x: F32, router_weight: F32, d_logits: F64) -> Tuple[F32, F32]: ...
def lora_backward(args: Tuple[Any, ...], kw: Dict[str, Any], base_t: Optional[Packed],
                  lora_a: F32, lora_b: F32, dy: F32, *, z: Optional[F32] = None,
                  dx: bool = True, d_lora_a: bool = True, d_lora_b: bool = True, d_weights: bool = True
                  ) -> Tuple[Optional[F32], Optional[F32], Optional[F32], Optional[F32]]: ...
def ffn_grouped_backward(ffn_args: Tuple[Any, ...], ffn_kwargs: Dict[str, Any], dy: F32, *,
                         w_gate: Optional[npt.NDArray[Any]] = None,
                         w_up: Optional[npt.NDArray[Any]] = None,
                         w_down: Optional[npt.NDArray[Any]] = None, biases: bool = False
                         ) -> Tuple[F32, Optional[F32], F32, F32, Optional[F32],
                                    Optional[F32], Optional[F32]]: ...
def pack_linear(w: npt.NDArray[Any], dtype: int, *, bias: Optional[F32] = None) -> Packed: ...
def linear_grouped(x: F32, token_index: Optional[I64], offsets: I64, weights: Packed) -> F32: ...
def pack_expert_lora(experts: Packed, rank: int, scaling: float, *,
                     a_gate: Optional[F32] = None, b_gate: Optional[F32] = None,
                     a_up: Optional[F32] = None, b_up: Optional[F32] = None,
                     a_down: Optional[F32] = None, b_down: Optional[F32] = None) -> Any: ...
def lora_forward(x: F32, base: Optional[Packed], kind: int, lora_a: Packed, bank: Packed,
                 n_adapters: int, ids: Optional[I32], weights: Optional[F32], scaling: float,
                 *, adapter_scaling: Optional[F32] = None, select_k: int = 0,
                 select_signed: int = 0, rank_bias: Optional[F32] = None,
                 save_z: bool = False) -> Tuple[F32, Optional[I32], I64, Optional[F32]]: ...
def soft_moe_forward(x: F32, phi: F32, experts: Packed, slots_per_expert: int,
                     activation: int, normalize: bool, scale: float, temperature: float, *,
                     across: bool = False, return_weights: bool = False, alpha: float = 1.702,
                     limit: float = 7.0, save: bool = False
                     ) -> Tuple[F32, Optional[F32], Optional[F32], Optional[F32]]: ...
def soft_moe_backward(args: Tuple[Any, ...], kw: Dict[str, Any], ys: F32, dy: F32, *,
                      w_gate: Optional[npt.NDArray[Any]] = None,
                      w_up: npt.NDArray[Any], w_down: npt.NDArray[Any]
                      ) -> Tuple[F32, F32, Optional[F32], F32, F32, float]: ...
def peer_forward(x: F32, w_query: F32, sub_keys_1: F32, sub_keys_2: F32, u: F32, v: F32,
                 top_k: int, activation: int, *, return_routing: bool = False
                 ) -> Tuple[F32, Optional[I32], Optional[F32]]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def build_info() -> Dict[str, Any]: ...
def cuda_info() -> Dict[str, Any]: ...
def cuda_route(logits: int, dtype: int, n_tokens: int, n_experts: int, top_k: int,
               scoring: int, renormalize: int, expert_ids: int, weights: int, stream: int, *,
               expert_bias: int = 0, n_groups: int = 1, topk_groups: int = 1,
               routed_scaling: float = 1.0) -> None: ...
