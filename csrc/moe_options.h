/*
 * moe_options.h - every option set of the core, each one list: the single
 * source of truth.  The enums of moe.h and their counts, the kernels'
 * switches (by enum name), the binding's range checks and the names moe._C
 * exports (moe/ and the tests read those, never a copy) all come from here.
 * An entry's position is its enum value: append, never reorder.
 *
 * Each list is an X-macro: X(NAME, "python name", ...), expanded by the
 * user with its own X.  Adding an activation is one line here, its formula
 * in the kernel (moe_vact, csrc/cpu/gemm.inc) and its formula in
 * moe/reference.py.
 */
#ifndef MOE_OPTIONS_H
#define MOE_OPTIONS_H

/* X(NAME, name, gated): gated ones multiply act(gate) by up and need w_gate. */
#define MOE_ACTIVATION_LIST(X)                                               \
    X(SWIGLU,     "swiglu",     1) /* silu(gate) * up                     */ \
    X(GEGLU,      "geglu",      1) /* gelu(gate) * up, exact erf gelu     */ \
    X(GEGLU_TANH, "geglu-tanh", 1) /* gelu_tanh(gate) * up                */ \
    X(GELU,       "gelu",       0) /* gelu(up)                            */ \
    X(GELU_TANH,  "gelu-tanh",  0) /* gelu_tanh(up)                       */ \
    X(RELU,       "relu",       0) /* relu(up)                            */ \
    X(SILU,       "silu",       0) /* silu(up)                            */ \
    X(SWIGLU_OAI, "swiglu-oai", 1) /* gpt-oss: clamped to +-limit, then
                                      (u + 1) g sigmoid(alpha g)             */

/* X(NAME, name) */
#define MOE_SCORING_LIST(X)                                                  \
    X(SOFTMAX,            "softmax")            /* over all E, then top-k  */ \
    X(SOFTMAX_AFTER_TOPK, "softmax-after-topk") /* top-k logits, softmax   */ \
    X(SIGMOID,            "sigmoid")            /* independent per expert  */

/*
 * X(NAME, name, quantized): storage of expert weights; activations are
 * float32.  The quantized ones (last) hold per-group scales besides the
 * values, w = value * scale, groups of group_size along k (the input
 * dimension of each weight row); only the expert FFN packs take them.
 */
#define MOE_DTYPE_LIST(X)                                                    \
    X(F32,   "float32",  0)                                                  \
    X(BF16,  "bfloat16", 0) /* bfloat16 bits in uint16                    */ \
    X(F16,   "float16",  0) /* IEEE half bits in uint16                   */ \
    X(INT8,  "int8",     1) /* int8 q, float16 scales: w = q s            */ \
    X(INT4,  "int4",     1) /* two per byte (low nibble: even k), nibble
                               n is q = n - 8; float16 scales: w = q s    */ \
    X(MXFP4, "mxfp4",    1) /* OCP MX: e2m1 nibbles as int4, e8m0 scales
                               (uint8 e: 2^(e - 127)), groups of 32       */

/*
 * X(NAME, name): what the expert FFN multiplies in (the pack's compute,
 * moe.SparseMoE's compute_dtype).
 */
#define MOE_COMPUTE_LIST(X)                                                  \
    X(FLOAT32,  "float32")  /* fp32 activations times the weights as
                               stored (quantized ones dequantized exactly) */ \
    X(BFLOAT16, "bfloat16") /* bf16 weights; the rows and the hidden
                               activations rounded to bf16                 */ \
    X(INT8,     "int8")     /* quantized weights; the rows and the hidden
                               activations quantized to int8 per row and
                               block (cpu/kernels.h: moe_q8_*), integer
                               dot products (VPDPBUSD where the CPU has it) */

/* X(NAME, name): how a layer routes (moe.SparseMoE's router=). */
#define MOE_ROUTER_LIST(X)                                                   \
    X(TOP_K,         "top_k")         /* token choice                      */ \
    X(EXPERT_CHOICE, "expert_choice") /* each expert takes its top tokens  */ \
    X(TOP_P,         "top_p")         /* fewest experts reaching mass p    */ \
    X(THRESHOLD,     "threshold")     /* every expert with prob >= p       */

/* X(NAME, name): the top-k router's gradient estimator (backward only). */
#define MOE_ROUTER_GRAD_LIST(X)                                              \
    X(DEFAULT,          "default")          /* through the selected weights
                                               and the losses only         */ \
    X(STRAIGHT_THROUGH, "straight-through") /* and the top-k mask, taken as
                                               the scores it was cut from   */

/* X(NAME, name): null experts (MoE++), never dispatched. */
#define MOE_NULL_LIST(X)                                                     \
    X(ZERO,     "zero")     /* adds nothing                               */ \
    X(COPY,     "copy")     /* adds w * x                                 */ \
    X(CONSTANT, "constant") /* adds w * v, v its row of null_values       */

/* X(NAME, name): the single-neuron experts' activation of PEER. */
#define MOE_PEER_ACTIVATION_LIST(X)                                          \
    X(RELU,     "relu")                                                      \
    X(GELU,     "gelu") /* exact erf gelu                                 */ \
    X(SILU,     "silu")                                                      \
    X(IDENTITY, "identity")

#endif /* MOE_OPTIONS_H */
