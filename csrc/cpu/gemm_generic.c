/* cpu/gemm_generic.c - micro-kernels for the build's baseline ISA (SSE2 on
 * x86-64, NEON on arm64, plain C elsewhere): 4 x 8 tiles. */
#define MOE_K_NAME moe_kernels_generic
#define MOE_K_ISA  "scalar"
#define MOE_K_VL   4
#define MOE_K_MR   4
#define MOE_K_NV   2
#include "gemm.inc"
