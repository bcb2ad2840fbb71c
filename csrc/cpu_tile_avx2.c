/* cpu_tile_avx2.c - the tile kernel built for AVX2 + FMA (x86-64 only). */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define MOE_TILE_NAME moe_cpu_tile_avx2
#define MOE_TILE_VL   8
#define MOE_TILE_SUB  1
#include "cpu_tile.inc"
#else
typedef int moe_cpu_tile_avx2_unused;
#endif
