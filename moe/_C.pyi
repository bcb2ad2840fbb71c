"""Type stubs for moe._C, the C extension (use the moe package, not this module).

Every array argument must already be a C-contiguous ndarray of the exact dtype noted;
moe/_api.py converts user input before calling these.
"""
from typing import Any, Dict, Optional, Tuple

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

def router_logits(x: F32, router_weight: F32) -> F64: ...
def route(logits: F64, top_k: int, scoring: int, renormalize: bool, routed_scaling: float,
          expert_bias: Optional[F32], n_groups: int, topk_groups: int,
          capacity_factor: float) -> Tuple[I32, F32, I64, int, float, float]: ...
def update_expert_bias(bias: F64, counts: I64, rate: float) -> None: ...
def dispatch(x: F32, expert_ids: I32, n_experts: int) -> Tuple[F32, I64, I64, I64]: ...
def combine(y_sorted: F32, position: I64, weights: F32) -> F32: ...
def ffn_grouped(x_sorted: F32, offsets: I64, w_gate: Optional[F32], w_up: F32, w_down: F32,
                activation: int) -> F32: ...
def layer_forward(x: F32, router_weight: F32, w_gate: Optional[F32], w_up: F32, w_down: F32,
                  top_k: int, activation: int, expert_bias: Optional[F32], scoring: int,
                  renormalize: bool, routed_scaling: float, n_groups: int, topk_groups: int,
                  capacity_factor: float, shared_w_gate: Optional[F32],
                  shared_w_up: Optional[F32], shared_w_down: Optional[F32],
                  shared_gate_weight: Optional[F32]
                  ) -> Tuple[F32, I32, F32, I64, int, float, float]: ...
def build_info() -> Dict[str, Any]: ...
