/*
 * cpu_tile.h - the tile kernel shared by the grouped FFN: one portable
 * version and, on x86-64, AVX2+FMA and AVX-512 builds of the same source
 * (cpu_tile.inc), chosen at run time from cpuid or MOE_ISA.
 */
#ifndef MOE_CPU_TILE_H
#define MOE_CPU_TILE_H

#include <stdint.h>

#define MOE_TILE_MR 4  /* rows of a (tokens) per tile                     */
#define MOE_TILE_NR 4  /* rows of b (weight rows) per tile                */
/*
 * Each ISA file also sets MOE_TILE_VL (partial sums per dot product: one
 * vector register) and MOE_TILE_SUB (rows of a per register block).
 */

typedef void (*moe_tile_fn)(const float *const a[MOE_TILE_MR],
                            const float *const b[MOE_TILE_NR], int64_t n,
                            float out[MOE_TILE_MR][MOE_TILE_NR]);

void moe_cpu_tile_scalar(const float *const a[MOE_TILE_MR],
                         const float *const b[MOE_TILE_NR], int64_t n,
                         float out[MOE_TILE_MR][MOE_TILE_NR]);
#if defined(__x86_64__) && defined(__GNUC__)
#define MOE_HAVE_X86_TILES 1
void moe_cpu_tile_avx2(const float *const a[MOE_TILE_MR],
                       const float *const b[MOE_TILE_NR], int64_t n,
                       float out[MOE_TILE_MR][MOE_TILE_NR]);
void moe_cpu_tile_avx512(const float *const a[MOE_TILE_MR],
                         const float *const b[MOE_TILE_NR], int64_t n,
                         float out[MOE_TILE_MR][MOE_TILE_NR]);
#endif

#endif /* MOE_CPU_TILE_H */
