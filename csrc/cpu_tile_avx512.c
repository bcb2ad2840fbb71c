/* cpu_tile_avx512.c - the tile kernel built for AVX-512F (x86-64 only). */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx2,fma,prefer-vector-width=512")
#define MOE_TILE_NAME moe_cpu_tile_avx512
#define MOE_TILE_VL   16
#define MOE_TILE_SUB  4
#include "cpu_tile.inc"
#else
typedef int moe_cpu_tile_avx512_unused;
#endif
