/* cpu/gemm_avx2.c - micro-kernels for AVX2 + FMA (+ F16C): 6 x 16 tiles. */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#define MOE_K_CVTPH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define MOE_K_MADDUBS(u, a)                                                  \
    _mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)(u), (__m256i)(a)),     \
                      _mm256_set1_epi16(1))
#define MOE_K_SHUFB(t, n) _mm256_shuffle_epi8((__m256i)(t), (__m256i)(n))
#define MOE_K_WIDEN(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define MOE_K_U8TOI32(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define MOE_K_S8TOI32(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define MOE_K_RINT(v)                                                       \
    _mm256_round_ps((__m256)(v),                          \
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define MOE_K_FMA(a, b, c)                                                   \
    _mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c))
#define MOE_K_NAME moe_kernels_avx2
#define MOE_K_ISA  "avx2"
#define MOE_K_VL   8
#define MOE_K_MR   6
#define MOE_K_NV   2
#include "gemm.inc"
#else
typedef int moe_cpu_gemm_avx2_unused;
#endif
