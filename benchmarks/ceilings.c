/*
 * ceilings.c - the machine's own limits, measured for the benchmarks:
 *   ./ceilings fma  THREADS SECONDS   register-only FMA loop -> GFLOP/s
 *   ./ceilings read THREADS MIB       streaming read of a buffer -> GB/s
 *   ./ceilings amx  THREADS SECONDS   register-only AMX-BF16 tile loop -> GFLOP/s
 *                                     ("0 none" without AMX or the Linux grant)
 * The FMA loop uses AVX-512 or AVX2+FMA when the CPU has them (checked at
 * run time), with twelve independent accumulators to cover FMA latency.
 * The read runs all threads at once (a barrier before and after each pass,
 * bytes of all threads over the slowest one's time, best of five passes),
 * with 32-byte loads into four accumulators where AVX2 is there: summing
 * each thread's own best pass instead counts passes that ran while the
 * other threads were idle, and a plain C loop (SSE2 loads) reads ~25% slower
 * than the memory system allows on one core.  The tile loop runs TDPBF16PS
 * on four independent accumulator tiles (16 x 16 fp32, 16 x 32 bf16 inputs:
 * 16 384 flops each) with operands already in tiles: the tile unit's own
 * rate, which no GEMM reaches (its operands come from L1 at best).
 * Build: cc -O3 -pthread ceilings.c -o ceilings
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef struct { int mode; double seconds; long mib; double result; int lanes; int id; int threads; } job_t;

static pthread_barrier_t pass_barrier;
static double pass_start;

/* Sum of n unsigned (n a multiple of 32, 32-byte aligned): the read loop. */
#if defined(__x86_64__)
__attribute__((target("avx2"))) static unsigned
sum256(const unsigned *b, size_t n)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 32) {
        a0 = _mm256_add_epi32(a0, _mm256_load_si256((const __m256i *)(b + i)));
        a1 = _mm256_add_epi32(a1, _mm256_load_si256((const __m256i *)(b + i + 8)));
        a2 = _mm256_add_epi32(a2, _mm256_load_si256((const __m256i *)(b + i + 16)));
        a3 = _mm256_add_epi32(a3, _mm256_load_si256((const __m256i *)(b + i + 24)));
    }
    a0 = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));
    return (unsigned)_mm256_extract_epi32(a0, 0);
}
#endif

static unsigned
sum_plain(const unsigned *b, size_t n)
{
    /* integer sums: associative, so the compiler vectorises the loop */
    unsigned s = 0;
    for (size_t i = 0; i < n; i++) {
        s += b[i];
    }
    return s;
}

#if defined(__x86_64__)
/*
 * FMA_CHAINS independent accumulator chains, each started from its own value
 * (seed + i, seed read at run time): chains that start equal are one chain
 * to the compiler, which then keeps a single FMA per iteration and the loop
 * measures FMA latency, not throughput.  Twelve chains cover latency x
 * ports (4 x 2) on current x86 cores and still fit 16 ymm registers.
 */
#define FMA_CHAINS 12
#define FMA_LOOP(VEC, SET1, FMADD)                                           \
    VEC a[FMA_CHAINS];                                                       \
    VEC b = SET1(0.999999f), c = SET1(1e-7f), s;                             \
    for (int i = 0; i < FMA_CHAINS; i++) a[i] = SET1(seed + (float)i);       \
    for (long k = 0; k < n; k++) {                                          \
        _Pragma("GCC unroll 16")                                             \
        for (int i = 0; i < FMA_CHAINS; i++) a[i] = FMADD(a[i], b, c);      \
    }                                                                        \
    s = a[0];                                                                \
    for (int i = 1; i < FMA_CHAINS; i++) s += a[i];                          \
    return s[0];

__attribute__((target("avx512f"))) static double
fma512(long n, float seed)
{
    FMA_LOOP(__m512, _mm512_set1_ps, _mm512_fmadd_ps)
}

__attribute__((target("avx2,fma"))) static double
fma256(long n, float seed)
{
    FMA_LOOP(__m256, _mm256_set1_ps, _mm256_fmadd_ps)
}
#endif

#if defined(__x86_64__)
/* Linux's grant of the tile state (ARCH_REQ_XCOMP_PERM, XTILEDATA). */
static int
amx_granted(void)
{
    unsigned long mask = 0;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0 &&
           syscall(SYS_arch_prctl, 0x1022, &mask) == 0 && (mask >> 18) & 1;
}

/* n rounds of four TDPBF16PS on tiles 0-3 from tiles 4-7 (palette 1, all
 * 16 rows x 64 bytes); returns a sum of the accumulators. */
__attribute__((target("amx-tile,amx-bf16"))) static double
amx_loop(long n)
{
    static const struct {
        unsigned char palette, start, reserved[14];
        unsigned short colsb[16];
        unsigned char rows[16];
    } cfg __attribute__((aligned(64))) = {
        1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64},
        {16, 16, 16, 16, 16, 16, 16, 16}};
    static unsigned short in[512] __attribute__((aligned(64)));
    static float out[4][256] __attribute__((aligned(64)));
    double s = 0;
    for (int i = 0; i < 512; i++) in[i] = 0x3c00; /* bf16 2^-7 */
    _tile_loadconfig(&cfg);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, in, 64); _tile_loadd(5, in, 64);
    _tile_loadd(6, in, 64); _tile_loadd(7, in, 64);
    for (long k = 0; k < n; k++) {
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out[0], 64); _tile_stored(1, out[1], 64);
    _tile_stored(2, out[2], 64); _tile_stored(3, out[3], 64);
    _tile_release();
    for (int i = 0; i < 4; i++) s += out[i][0];
    return s;
}
#endif

static void *
run(void *arg)
{
    job_t *j = arg;
    if (j->mode == 2) {
#if defined(__x86_64__)
        long n = 100000, total = 0;
        double t0 = now(), sink = 0;
        while (now() - t0 < j->seconds) {
            sink += amx_loop(n);
            total += n;
        }
        j->result = 4.0 * 16384 * total / (now() - t0) / 1e9 + 0 * sink;
#endif
        return NULL;
    }
    if (j->mode == 0) {
        long n = 1000000, total = 0;
        double t0 = now(), sink = 0;
        volatile float seed = 1.0f; /* unknown to the compiler */
        while (now() - t0 < j->seconds) {
#if defined(__x86_64__)
            if (j->lanes == 16) sink += fma512(n, seed); else sink += fma256(n, seed);
#endif
            total += n;
        }
        j->result = 2.0 * j->lanes * FMA_CHAINS * total / (now() - t0) / 1e9 + 0 * sink;
    }
    else {
        size_t n = ((size_t)j->mib << 18) & ~(size_t)31; /* floats */
        unsigned *buf = aligned_alloc(4096, n * sizeof(unsigned));
        memset(buf, 1, n * sizeof(unsigned));
        double best = 0;
        for (int rep = 0; rep < 5; rep++) {
            unsigned s;
            pthread_barrier_wait(&pass_barrier);
            if (j->id == 0) pass_start = now();
            pthread_barrier_wait(&pass_barrier);
#if defined(__x86_64__)
            s = j->lanes ? sum256(buf, n) : sum_plain(buf, n);
#else
            s = sum_plain(buf, n);
#endif
            pthread_barrier_wait(&pass_barrier); /* the slowest thread's end */
            double gbs = n * 4.0 * j->threads / (now() - pass_start) / 1e9;
            if (gbs > best && s != 7) best = gbs;
        }
        j->result = j->id == 0 ? best : 0;
        free(buf);
    }
    return NULL;
}

int
main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s fma|read|amx THREADS SECONDS|MIB\n", argv[0]);
        return 2;
    }
    int mode = strcmp(argv[1], "read") == 0 ? 1 : strcmp(argv[1], "amx") == 0 ? 2 : 0;
    int nt = atoi(argv[2]), lanes = 8;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) lanes = 16;
    else if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) lanes = 0;
#else
    lanes = 0;
#endif
    if (mode == 0 && lanes == 0) { printf("0 none\n"); return 0; }
    if (mode == 2) {
#if defined(__x86_64__)
        if (!__builtin_cpu_supports("amx-bf16") || !amx_granted()) {
            printf("0 none\n");
            return 0;
        }
#else
        printf("0 none\n");
        return 0;
#endif
    }
    if (nt < 1 || nt > 256) { fprintf(stderr, "THREADS: 1 to 256\n"); return 2; }
    pthread_barrier_init(&pass_barrier, NULL, (unsigned)nt);
    pthread_t th[256];
    job_t jobs[256];
    for (int i = 0; i < nt; i++) {
        jobs[i] = (job_t){mode, atof(argv[3]), atol(argv[3]) / nt, 0, lanes, i, nt};
        pthread_create(&th[i], NULL, run, &jobs[i]);
    }
    double total = 0;
    for (int i = 0; i < nt; i++) { pthread_join(th[i], NULL); total += jobs[i].result; }
    printf("%.2f %s\n", total, mode == 1 ? "read" : mode == 2 ? "amx"
                                : lanes == 16 ? "avx512" : "avx2");
    return 0;
}
