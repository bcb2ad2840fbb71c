"""Type stubs for the public moe API."""
from typing import IO, Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

from . import reference as reference
from . import cuda as cuda
from . import lora as lora
from . import safetensors as safetensors
from . import quant as quant

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
          capacity_factor: Optional[float] = ...,
          allowed: Optional[ArrayLike] = ...) -> RoutingResult: ...
def update_expert_bias(bias: npt.NDArray[np.floating], counts: ArrayLike,
                       rate: float) -> npt.NDArray[np.floating]: ...
def dispatch(x: ArrayLike, expert_ids: ArrayLike, n_experts: int) -> Dispatch: ...
def combine(y_sorted: ArrayLike, position: ArrayLike,
            weights: ArrayLike) -> npt.NDArray[np.float32]: ...

class ExpertChoiceResult(NamedTuple):
    token_ids: npt.NDArray[np.int64]            # (E, C), best first
    gates: npt.NDArray[np.float32]              # (E, C)
    n_experts_per_token: npt.NDArray[np.int32]  # (T,)
    expert_ids: npt.NDArray[np.int32]           # (T, W <= E), ascending, -1 padding
    weights: npt.NDArray[np.float32]            # (T, W), 0 padding
    capacity: int

class DynamicRoutingResult(NamedTuple):
    expert_ids: npt.NDArray[np.int32]   # (T, k_max), -1 padding
    weights: npt.NDArray[np.float32]    # (T, k_max), 0 padding
    n_selected: npt.NDArray[np.int32]   # (T,)

class SkipResult(NamedTuple):
    expert_ids: npt.NDArray[np.int32]   # (T, k), -1 = skipped or empty
    weights: npt.NDArray[np.float32]    # (T, k)
    n_skipped: int

def route_expert_choice(logits: ArrayLike, capacity_factor: Optional[float] = ..., *,
                        capacity: Optional[int] = ...,
                        scoring: str = ...) -> ExpertChoiceResult: ...
def route_top_p(logits: ArrayLike, p: float, *, k_min: int = ..., k_max: Optional[int] = ...,
                renormalize: bool = ...) -> DynamicRoutingResult: ...
def route_threshold(logits: ArrayLike, threshold: float, *, k_min: int = ...,
                    k_max: Optional[int] = ..., renormalize: bool = ...) -> DynamicRoutingResult: ...
def skip_experts(expert_ids: ArrayLike, weights: ArrayLike, threshold: float, *,
                 renormalize: bool = ...) -> SkipResult: ...
WEIGHT_DTYPES: Tuple[str, ...]
QUANT_DTYPES: Tuple[str, ...]
COMPUTE_DTYPES: Tuple[str, ...]

class QuantizedWeight:
    values: npt.NDArray[Any]   # int8, or uint8 nibble pairs (int4, mxfp4)
    scales: npt.NDArray[Any]   # float16, or uint8 e8m0 (mxfp4)
    dtype: str
    group_size: int            # 0: one scale per row
    shape: Tuple[int, ...]     # of the float weight it stands for
    def __init__(self, values: ArrayLike, scales: ArrayLike, dtype: str,
                 shape: Sequence[int], group_size: Optional[int] = ...) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def ndim(self) -> int: ...
    def __getitem__(self, index: int) -> "QuantizedWeight": ...
    def dequantize(self) -> npt.NDArray[np.float32]: ...

class PackedExperts:
    n_experts: int
    d_model: int
    d_ff: int
    gated: bool
    dtype: str
    compute_dtype: str
    nbytes: int
    activation: str
    isa: str
    group_size: Optional[int]

def pack_experts(w_gate: Union[ArrayLike, QuantizedWeight, None],
                 w_up: Union[ArrayLike, QuantizedWeight],
                 w_down: Union[ArrayLike, QuantizedWeight],
                 activation: str = ..., dtype: Optional[str] = ..., *,
                 b_gate: Optional[ArrayLike] = ..., b_up: Optional[ArrayLike] = ...,
                 b_down: Optional[ArrayLike] = ...,
                 compute_dtype: str = ...,
                 group_size: Optional[int] = ...) -> PackedExperts: ...
def expert_ffn(x_sorted: ArrayLike, offsets: ArrayLike,
               w_gate: Union[ArrayLike, PackedExperts, None],
               w_up: Optional[ArrayLike] = ..., w_down: Optional[ArrayLike] = ...,
               activation: str = ..., dtype: Optional[str] = ...) -> npt.NDArray[np.float32]: ...
def ffn(x: ArrayLike, w_gate: Optional[ArrayLike], w_up: ArrayLike, w_down: ArrayLike,
        activation: str = ..., dtype: Optional[str] = ...) -> npt.NDArray[np.float32]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def float32_to_bfloat16(a: ArrayLike) -> npt.NDArray[np.uint16]: ...
def bfloat16_to_float32(bits: ArrayLike) -> npt.NDArray[np.float32]: ...
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
    dtype: str
    shared_dtype: str
    group_size: Optional[int]
    router_weight: npt.NDArray[np.float32]
    # FFN weights: float32, float16, or uint16 bfloat16 bits, by `dtype`; QuantizedWeight
    # for the quantized dtypes
    w_gate: Union[npt.NDArray[Any], QuantizedWeight, None]
    w_up: Union[npt.NDArray[Any], QuantizedWeight]
    w_down: Union[npt.NDArray[Any], QuantizedWeight]
    expert_bias: Optional[npt.NDArray[np.float32]]
    shared_w_gate: Union[npt.NDArray[Any], QuantizedWeight, None]
    shared_w_up: Union[npt.NDArray[Any], QuantizedWeight, None]
    shared_w_down: Union[npt.NDArray[Any], QuantizedWeight, None]
    shared_gate_weight: Optional[npt.NDArray[np.float32]]
    def __init__(self, d_model: int, d_ff: Union[int, Sequence[int]], n_experts: int,
                 top_k: int, *,
                 activation: str = ..., scoring: str = ..., renormalize: bool = ...,
                 routed_scaling: float = ..., n_groups: int = ..., topk_groups: int = ...,
                 expert_bias: bool = ..., n_shared_experts: int = ...,
                 shared_d_ff: Optional[int] = ..., shared_expert_gate: bool = ...,
                 capacity_factor: Optional[float] = ..., dtype: str = ...,
                 seed: int = ..., init: bool = ..., router_bias: bool = ...,
                 expert_biases: bool = ..., swiglu_alpha: float = ...,
                 swiglu_limit: float = ..., lora_rank: int = ...,
                 lora_alpha: Optional[float] = ...,
                 lora_targets: Optional[Sequence[str]] = ...,
                 null_experts: Sequence[str] = ..., router: str = ...,
                 router_p: float = ..., router_threshold: float = ...,
                 k_min: int = ..., skip_threshold: float = ...,
                 skip_renormalize: bool = ..., compute_dtype: str = ...,
                 router_grad: str = ..., group_size: Optional[int] = ...,
                 shared_dtype: Optional[str] = ...) -> None: ...
    skip_threshold: float
    skip_renormalize: bool
    compute_dtype: str
    router_grad: str
    expert_d_ff: Optional[Tuple[int, ...]]
    null_experts: Tuple[str, ...]
    n_null: int
    null_values: Optional[npt.NDArray[np.float32]]
    router: str
    router_p: float
    router_threshold: float
    k_min: int
    expert_mask: Optional[npt.NDArray[np.bool_]]
    @property
    def n_router(self) -> int: ...
    lora_rank: int
    lora_alpha: float
    lora_targets: Tuple[str, ...]
    @property
    def lora_scaling(self) -> float: ...
    def pack(self) -> "SparseMoE": ...
    def save(self, path: Any) -> None: ...
    def config(self) -> dict[str, Any]: ...
    @overload
    def __call__(self, x: ArrayLike, *, allowed: Optional[ArrayLike] = ...,
                 groups: Optional[ArrayLike] = ...) -> npt.NDArray[np.float32]: ...
    @overload
    def __call__(self, x: ArrayLike, return_routing: bool, *,
                 allowed: Optional[ArrayLike] = ..., groups: Optional[ArrayLike] = ...
                 ) -> Union[npt.NDArray[np.float32],
                            Tuple[npt.NDArray[np.float32], RoutingResult]]: ...
    def flops(self, n_tokens: int) -> int: ...
    def trainable_weights(self) -> Tuple[str, ...]: ...
    def forward_train(self, x: ArrayLike, *, allowed: Optional[ArrayLike] = ...,
                      groups: Optional[ArrayLike] = ...
                      ) -> Tuple[npt.NDArray[np.float32], "TrainContext"]: ...
    def backward(self, ctx: "TrainContext", dy: ArrayLike, *, aux_coef: float = ...,
                 z_coef: float = ..., retain: bool = ...
                 ) -> dict[str, npt.NDArray[np.float32]]: ...

class SparseRows(NamedTuple):
    indices: npt.NDArray[np.int64]     # (U,) ascending row ids
    values: npt.NDArray[np.float32]    # (U, width)
    n_rows: int
    def to_dense(self) -> npt.NDArray[np.float32]: ...

class TrainContext:
    routing: RoutingResult
    released: bool

def route_backward(logits: ArrayLike, expert_ids: ArrayLike, d_weights: ArrayLike,
                   top_k: int, *, aux_coef: float = ..., z_coef: float = ...,
                   router_grad: str = ..., **options: Any) -> npt.NDArray[np.float64]: ...
def combine_backward(y_sorted: ArrayLike, position: ArrayLike, weights: ArrayLike,
                     d_out: ArrayLike
                     ) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def dispatch_backward(dx_sorted: ArrayLike, position: ArrayLike) -> npt.NDArray[np.float32]: ...
def expert_ffn_backward(x_sorted: ArrayLike, offsets: ArrayLike, w_gate: Optional[ArrayLike],
                        w_up: ArrayLike, w_down: ArrayLike, dy_sorted: ArrayLike,
                        activation: str = ..., dtype: Optional[str] = ..., *,
                        b_gate: Optional[ArrayLike] = ..., b_up: Optional[ArrayLike] = ...,
                        b_down: Optional[ArrayLike] = ..., swiglu_alpha: float = ...,
                        swiglu_limit: float = ...
                        ) -> dict[str, Optional[npt.NDArray[np.float32]]]: ...
def ffn_backward(x: ArrayLike, w_gate: Optional[ArrayLike], w_up: ArrayLike, w_down: ArrayLike,
                 dy: ArrayLike, activation: str = ..., dtype: Optional[str] = ...
                 ) -> dict[str, Optional[npt.NDArray[np.float32]]]: ...

class NullRoutingResult(NamedTuple):
    expert_ids: npt.NDArray[np.int32]
    weights: npt.NDArray[np.float32]
    counts: npt.NDArray[np.int64]
    n_dropped: int
    aux_loss: float
    z_loss: float
    n_real: npt.NDArray[np.int32]

def prune_experts(layer: SparseMoE, keep: ArrayLike
                  ) -> Tuple[SparseMoE, npt.NDArray[np.int64]]: ...

class MultiHeadMoE:
    d_model: int
    n_heads: int
    d_head: int
    dtype: str
    moe: SparseMoE
    w_in: npt.NDArray[Any]
    w_merge: npt.NDArray[Any]
    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_experts: int, top_k: int, *,
                 dtype: str = ..., seed: int = ..., init: bool = ...,
                 **moe_options: Any) -> None: ...
    def pack(self) -> "MultiHeadMoE": ...
    def __call__(self, x: ArrayLike, return_routing: bool = ...) -> Any: ...
    def trainable_weights(self) -> Tuple[str, ...]: ...
    def forward_train(self, x: ArrayLike) -> Tuple[npt.NDArray[np.float32], "TrainContext"]: ...
    def backward(self, ctx: "TrainContext", dy: ArrayLike, *, aux_coef: float = ...,
                 z_coef: float = ..., retain: bool = ...
                 ) -> dict[str, npt.NDArray[np.float32]]: ...


class RoutingStats:
    n_experts: int
    def __init__(self, n_experts: int) -> None: ...
    def reset(self) -> "RoutingStats": ...
    def update(self, routing: Union[RoutingResult, ArrayLike],
               weights: Optional[ArrayLike] = ...) -> "RoutingStats": ...
    @property
    def load(self) -> npt.NDArray[np.int64]: ...          # (E,)
    @property
    def assignments(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def calls(self) -> int: ...
    @property
    def fraction(self) -> npt.NDArray[np.float64]: ...    # (E,)
    @property
    def mean_gate(self) -> npt.NDArray[np.float64]: ...   # (E,), NaN where no assignment
    @property
    def entropy(self) -> float: ...
    @property
    def normalized_entropy(self) -> float: ...
    @property
    def max_over_mean(self) -> float: ...
    def to_dict(self) -> dict[str, Any]: ...
    def _repr_html_(self) -> str: ...
    def plot(self, ax: Any = ...) -> Any: ...              # matplotlib Axes

def routing_stats(layer: SparseMoE, x: ArrayLike) -> RoutingStats: ...
def upcycle(w_gate: Optional[ArrayLike], w_up: ArrayLike, w_down: ArrayLike, n_experts: int,
            top_k: int, method: str = ..., *, partition: str = ..., activation: str = ...,
            router: Union[str, ArrayLike] = ..., seed: int = ...,
            dtype: str = ...) -> SparseMoE: ...
def from_hf(path: Any, layer: int, *, dtype: Optional[str] = ...,
            progress: Union[None, bool, Callable[[int, int, str], Any]] = ...) -> SparseMoE: ...
def load(path: Any) -> Any: ...  # the saved layer's class
def save(layer: Any, path: Any) -> None: ...

# ---- LoRA experts (moe.lora) ------------------------------------------------------------

def sparse_projection(rank: int, d_in: int, density: float,
                      seed: int = ...) -> npt.NDArray[np.float32]: ...

class _LoRALayer:
    d_in: int
    d_out: int
    rank: int
    alpha: float
    dtype: str
    use_bias: bool
    base_weight: npt.NDArray[Any]             # (d_out, d_in), in `dtype`
    base_bias: Optional[npt.NDArray[np.float32]]
    lora_a: npt.NDArray[np.float32]
    lora_b: npt.NDArray[np.float32]
    @property
    def scaling(self) -> float: ...
    def pack(self) -> Any: ...
    def base_forward(self, x: ArrayLike) -> npt.NDArray[np.float32]: ...
    def flops(self, n_tokens: int) -> int: ...
    def trainable_weights(self) -> Tuple[str, ...]: ...
    # the per-call inputs of __call__ (scalings, adapter_ids, seq_lens=...)
    def forward_train(self, x: ArrayLike, *args: Any, **kwargs: Any
                      ) -> Tuple[npt.NDArray[np.float32], "TrainContext"]: ...
    def backward(self, ctx: "TrainContext", dy: ArrayLike, *, aux_coef: float = ...,
                 z_coef: float = ..., retain: bool = ...
                 ) -> Dict[str, npt.NDArray[np.float32]]: ...

class TopKLoRA(_LoRALayer):
    n_experts: int
    top_k: int
    scoring: str
    renormalize: bool
    per_sequence: bool
    router_weight: npt.NDArray[np.float32]
    def __init__(self, d_in: int, d_out: int, n_experts: int, rank: int, top_k: int = ..., *,
                 alpha: Optional[float] = ..., scoring: str = ..., renormalize: bool = ...,
                 per_sequence: bool = ..., bias: bool = ..., dtype: str = ..., seed: int = ...,
                 init: bool = ...) -> None: ...
    def __call__(self, x: ArrayLike, *, seq_lens: Optional[ArrayLike] = ...,
                 return_routing: bool = ...) -> Any: ...

class SoftLoRA(TopKLoRA):
    def __init__(self, d_in: int, d_out: int, n_experts: int, rank: int,
                 top_k: Optional[int] = ..., *, alpha: Optional[float] = ...,
                 per_sequence: bool = ..., bias: bool = ..., dtype: str = ..., seed: int = ...,
                 init: bool = ...) -> None: ...

class HydraLoRA(_LoRALayer):
    n_experts: int
    top_k: Optional[int]
    renormalize: bool
    per_sequence: bool
    router_weight: npt.NDArray[np.float32]
    def __init__(self, d_in: int, d_out: int, n_experts: int, rank: int,
                 top_k: Optional[int] = ..., *, alpha: Optional[float] = ...,
                 renormalize: bool = ..., per_sequence: bool = ..., bias: bool = ...,
                 dtype: str = ..., seed: int = ..., init: bool = ...) -> None: ...
    def __call__(self, x: ArrayLike, *, seq_lens: Optional[ArrayLike] = ...,
                 return_routing: bool = ...) -> Any: ...

class GatedLoRA(_LoRALayer):
    n_experts: int
    top_k: Optional[int]
    softmax_topk: bool
    def __init__(self, d_in: int, d_out: int, n_experts: int, rank: int, *,
                 top_k: Optional[int] = ..., softmax_topk: bool = ...,
                 alpha: Optional[float] = ..., bias: bool = ..., dtype: str = ...,
                 seed: int = ..., init: bool = ...) -> None: ...
    def __call__(self, x: ArrayLike, scalings: ArrayLike, *,
                 return_routing: bool = ...) -> Any: ...

class FlyLoRA(_LoRALayer):
    top_k: int
    density: float
    signed: bool
    bias_rate: float
    update_bias_mode: str
    rank_bias: npt.NDArray[np.float32]
    def __init__(self, d_in: int, d_out: int, rank: int, top_k: int, *,
                 alpha: Optional[float] = ..., density: Optional[float] = ...,
                 signed: bool = ..., bias_rate: float = ..., update_bias: str = ...,
                 bias: bool = ..., dtype: str = ..., seed: int = ...,
                 init: bool = ...) -> None: ...
    def update_bias(self, counts: ArrayLike,
                    rate: Optional[float] = ...) -> npt.NDArray[np.float32]: ...
    def __call__(self, x: ArrayLike, *, return_routing: bool = ...) -> Any: ...

class SMoRA(_LoRALayer):
    top_k: int
    rank_partition: int
    tile: bool
    router_weight: npt.NDArray[np.float32]
    rank_bias: npt.NDArray[np.float32]
    def __init__(self, d_in: int, d_out: int, rank: int, top_k: int, *,
                 rank_partition: int = ..., tile: bool = ..., alpha: Optional[float] = ...,
                 bias: bool = ..., dtype: str = ..., seed: int = ...,
                 init: bool = ...) -> None: ...
    def update_bias(self, counts: ArrayLike,
                    rate: float = ...) -> npt.NDArray[np.float32]: ...
    def __call__(self, x: ArrayLike, *, return_routing: bool = ...) -> Any: ...

class MultiLoRA(_LoRALayer):
    scalings: npt.NDArray[np.float32]
    @property
    def n_adapters(self) -> int: ...
    def __init__(self, d_in: int, d_out: int, n_adapters: int, rank: int, *,
                 alpha: Optional[float] = ..., bias: bool = ..., dtype: str = ...,
                 seed: int = ..., init: bool = ...) -> None: ...
    def set_adapter(self, i: int, lora_a: ArrayLike, lora_b: ArrayLike,
                    alpha: Optional[float] = ...) -> None: ...
    def __call__(self, x: ArrayLike, adapter_ids: ArrayLike, *,
                 return_routing: bool = ...) -> Any: ...

class SoftMoE:
    d_model: int
    d_ff: int
    n_experts: int
    slots_per_expert: int
    activation: str
    normalize: bool
    scale: float
    dtype: str
    swiglu_alpha: float
    swiglu_limit: float
    phi: npt.NDArray[np.float32]           # (d_model, n_experts * slots_per_expert)
    # FFN weights: float32, float16, or uint16 bfloat16 bits, by `dtype`
    w_gate: Optional[npt.NDArray[Any]]     # (E, F, d)
    w_up: npt.NDArray[Any]                 # (E, F, d)
    w_down: npt.NDArray[Any]               # (E, d, F)
    def __init__(self, d_model: int, d_ff: int, n_experts: int, slots_per_expert: int = ...,
                 *, activation: str = ..., normalize: bool = ..., scale: float = ...,
                 dtype: str = ..., seed: int = ..., init: bool = ...,
                 swiglu_alpha: float = ..., swiglu_limit: float = ...) -> None: ...
    @property
    def n_slots(self) -> int: ...
    def pack(self) -> "SoftMoE": ...
    # y, or (y, dispatch, combine) with return_weights=True
    def __call__(self, x: ArrayLike, return_weights: bool = ...) -> Any: ...
    def flops(self, n_groups: int, group_size: int) -> int: ...
    def trainable_weights(self) -> Tuple[str, ...]: ...
    def forward_train(self, x: ArrayLike) -> Tuple[npt.NDArray[np.float32], "TrainContext"]: ...
    # "x", "phi", ["w_gate",] "w_up", "w_down" arrays; "scale" a float (normalize=True)
    def backward(self, ctx: "TrainContext", dy: ArrayLike, *,
                 retain: bool = ...) -> Dict[str, Any]: ...

class MixtureOfTokens(SoftMoE):
    temperature: float
    mixing: bool
    group_size: Optional[int]
    def __init__(self, d_model: int, d_ff: int, n_experts: int, slots_per_expert: int = ...,
                 *, temperature: float = ..., mixing: bool = ...,
                 group_size: Optional[int] = ..., activation: str = ...,
                 normalize: bool = ..., scale: float = ..., dtype: str = ...,
                 seed: int = ..., init: bool = ..., swiglu_alpha: float = ...,
                 swiglu_limit: float = ...) -> None: ...

# ---- product-key expert retrieval (moe.peer) --------------------------------------------

class PEERRouting(NamedTuple):
    expert_ids: npt.NDArray[np.int32]   # (..., n_heads, top_k), best first, e = i * n + j
    gates: npt.NDArray[np.float32]      # (..., n_heads, top_k)

class PEER:
    d_model: int
    n_sub_keys: int
    n_heads: int
    top_k: int
    d_key: int
    activation: str
    d_out: int
    per_head_keys: bool
    w_query: Optional[npt.NDArray[np.float32]]      # (n_heads, d_key, d_model)
    sub_keys_1: Optional[npt.NDArray[np.float32]]   # (n_heads, n, d_key / 2) or (n, d_key / 2)
    sub_keys_2: Optional[npt.NDArray[np.float32]]
    u: Optional[npt.NDArray[np.float32]]            # (n^2, d_model)
    v: Optional[npt.NDArray[np.float32]]            # (n^2, d_out)
    def __init__(self, d_model: int, n_sub_keys: int, n_heads: int = ..., top_k: int = ...,
                 d_key: Optional[int] = ..., activation: str = ..., seed: int = ..., *,
                 d_out: Optional[int] = ..., per_head_keys: bool = ...,
                 init: bool = ...) -> None: ...
    @property
    def n_experts(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @overload
    def __call__(self, x: ArrayLike) -> npt.NDArray[np.float32]: ...
    @overload
    def __call__(self, x: ArrayLike, return_routing: bool) -> Union[
        npt.NDArray[np.float32], Tuple[npt.NDArray[np.float32], PEERRouting]]: ...
    def flops(self, n_tokens: int) -> int: ...
    def trainable_weights(self) -> Tuple[str, ...]: ...
    def forward_train(self, x: ArrayLike) -> Tuple[npt.NDArray[np.float32], "TrainContext"]: ...
    # "x", "w_query", "sub_keys_1", "sub_keys_2" arrays; "u", "v" SparseRows
    def backward(self, ctx: "TrainContext", dy: ArrayLike, *,
                 retain: bool = ...) -> Dict[str, Any]: ...
def quantize(layer: SparseMoE, dtype: str, group_size: Optional[int] = ..., *,
             shared_dtype: Optional[str] = ...,
             calibration: Optional[ArrayLike] = ...,
             compute_dtype: str = ...) -> SparseMoE: ...
