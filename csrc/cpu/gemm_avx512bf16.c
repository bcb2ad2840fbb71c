/* cpu/gemm_avx512bf16.c - the AVX-512 set (12 x 32 tiles) with AVX512-BF16,
 * -BW and -VNNI (every CPU with BF16 has the other two): the bf16-compute
 * kernel runs VDPBF16PS (cpu/gemm.inc: MOE_K_DPBF16), the int8-compute one
 * VPDPBUSD. */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx512bf16,avx2,fma,f16c,prefer-vector-width=512")
#include <immintrin.h>
#define MOE_K_CVTPH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define MOE_K_DPBF16(acc, a, b)                                              \
    ((moe_vf)_mm512_dpbf16_ps((__m512)(acc), (__m512bh)(a), (__m512bh)(b)))
#define MOE_K_DPBUSD(acc, u, a)                                              \
    _mm512_dpbusd_epi32((__m512i)(acc), (__m512i)(u), (__m512i)(a))
#define MOE_K_SHUFB(t, n) _mm512_shuffle_epi8((__m512i)(t), (__m512i)(n))
#define MOE_K_WIDEN(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define MOE_K_U8TOI32(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define MOE_K_S8TOI32(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define MOE_K_RINT(v)                                                       \
    _mm512_roundscale_ps((__m512)(v),                          \
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define MOE_K_FMA(a, b, c)                                                   \
    _mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c))
#define MOE_K_NAME moe_kernels_avx512bf16
#define MOE_K_ISA  "avx512bf16"
#define MOE_K_VL   16
#define MOE_K_MR   12
#define MOE_K_NV   2
#include "gemm.inc"
#else
typedef int moe_cpu_gemm_avx512bf16_unused;
#endif
