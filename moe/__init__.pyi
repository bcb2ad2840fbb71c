"""Type stubs for the public moe API."""
from typing import IO, Any, NamedTuple, Optional, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

from . import reference as reference

ArrayLike = Any  # NumPy arrays, array-likes, or CPU objects with __dlpack__

__version__: str
SCORINGS: Tuple[str, ...]
ACTIVATIONS: Tuple[str, ...]

class RoutingResult(NamedTuple):
    expert_ids: npt.NDArray[np.int32]   # (T, k), -1 = dropped
    weights: npt.NDArray[np.float32]    # (T, k)
    counts: npt.NDArray[np.int64]       # (E,)
    n_dropped: int
    aux_loss: float
    z_loss: float

class Dispatch(NamedTuple):
    x_sorted: npt.NDArray[np.float32]   # (N, d)
    offsets: npt.NDArray[np.int64]      # (E + 1,)
    token_index: npt.NDArray[np.int64]  # (N,)
    position: npt.NDArray[np.int64]     # (T, k), -1 = not dispatched
    counts: npt.NDArray[np.int64]       # (E,)

def route(logits: ArrayLike, top_k: int, *, scoring: str = ..., renormalize: bool = ...,
          routed_scaling: float = ..., expert_bias: Optional[ArrayLike] = ...,
          n_groups: int = ..., topk_groups: int = ...,
          capacity_factor: Optional[float] = ...) -> RoutingResult: ...
def update_expert_bias(bias: npt.NDArray[np.floating], counts: ArrayLike,
                       rate: float) -> npt.NDArray[np.floating]: ...
def dispatch(x: ArrayLike, expert_ids: ArrayLike, n_experts: int) -> Dispatch: ...
def combine(y_sorted: ArrayLike, position: ArrayLike,
            weights: ArrayLike) -> npt.NDArray[np.float32]: ...
def expert_ffn(x_sorted: ArrayLike, offsets: ArrayLike, w_gate: Optional[ArrayLike],
               w_up: ArrayLike, w_down: ArrayLike,
               activation: str = ...) -> npt.NDArray[np.float32]: ...
def ffn(x: ArrayLike, w_gate: Optional[ArrayLike], w_up: ArrayLike, w_down: ArrayLike,
        activation: str = ...) -> npt.NDArray[np.float32]: ...
def show_config(file: Optional[IO[str]] = ...) -> None: ...
def cuda_available() -> bool: ...

class SparseMoE:
    d_model: int
    d_ff: int
    n_experts: int
    top_k: int
    activation: str
    scoring: str
    renormalize: bool
    routed_scaling: float
    n_groups: int
    topk_groups: int
    capacity_factor: Optional[float]
    n_shared_experts: int
    shared_d_ff: int
    shared_expert_gate: bool
    use_expert_bias: bool
    router_weight: npt.NDArray[np.float32]
    w_gate: Optional[npt.NDArray[np.float32]]
    w_up: npt.NDArray[np.float32]
    w_down: npt.NDArray[np.float32]
    expert_bias: Optional[npt.NDArray[np.float32]]
    shared_w_gate: Optional[npt.NDArray[np.float32]]
    shared_w_up: Optional[npt.NDArray[np.float32]]
    shared_w_down: Optional[npt.NDArray[np.float32]]
    shared_gate_weight: Optional[npt.NDArray[np.float32]]
    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, *,
                 activation: str = ..., scoring: str = ..., renormalize: bool = ...,
                 routed_scaling: float = ..., n_groups: int = ..., topk_groups: int = ...,
                 expert_bias: bool = ..., n_shared_experts: int = ...,
                 shared_d_ff: Optional[int] = ..., shared_expert_gate: bool = ...,
                 capacity_factor: Optional[float] = ..., seed: int = ...) -> None: ...
    @overload
    def __call__(self, x: ArrayLike) -> npt.NDArray[np.float32]: ...
    @overload
    def __call__(self, x: ArrayLike, return_routing: bool) -> Union[
        npt.NDArray[np.float32], Tuple[npt.NDArray[np.float32], RoutingResult]]: ...
    def flops(self, n_tokens: int) -> int: ...
