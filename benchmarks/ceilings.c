/*
 * ceilings.c - the machine's own limits, measured for the benchmarks:
 *   ./ceilings fma  THREADS SECONDS   register-only FMA loop -> GFLOP/s
 *   ./ceilings read THREADS MIB       streaming read of a buffer -> GB/s
 * The FMA loop uses AVX-512 or AVX2+FMA when the CPU has them (checked at
 * run time), with ten independent accumulators to cover FMA latency.
 * Build: cc -O3 -pthread ceilings.c -o ceilings
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef struct { int mode; double seconds; long mib; double result; int lanes; } job_t;

#if defined(__x86_64__)
__attribute__((target("avx512f"))) static double
fma512(long n)
{
    __m512 a0 = _mm512_set1_ps(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
           a6 = a0, a7 = a0, a8 = a0, a9 = a0;
    __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    for (long k = 0; k < n; k++) {
        a0 = _mm512_fmadd_ps(a0, b, c); a1 = _mm512_fmadd_ps(a1, b, c);
        a2 = _mm512_fmadd_ps(a2, b, c); a3 = _mm512_fmadd_ps(a3, b, c);
        a4 = _mm512_fmadd_ps(a4, b, c); a5 = _mm512_fmadd_ps(a5, b, c);
        a6 = _mm512_fmadd_ps(a6, b, c); a7 = _mm512_fmadd_ps(a7, b, c);
        a8 = _mm512_fmadd_ps(a8, b, c); a9 = _mm512_fmadd_ps(a9, b, c);
    }
    __m512 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9;
    return s[0];
}

__attribute__((target("avx2,fma"))) static double
fma256(long n)
{
    __m256 a0 = _mm256_set1_ps(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
           a6 = a0, a7 = a0, a8 = a0, a9 = a0;
    __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (long k = 0; k < n; k++) {
        a0 = _mm256_fmadd_ps(a0, b, c); a1 = _mm256_fmadd_ps(a1, b, c);
        a2 = _mm256_fmadd_ps(a2, b, c); a3 = _mm256_fmadd_ps(a3, b, c);
        a4 = _mm256_fmadd_ps(a4, b, c); a5 = _mm256_fmadd_ps(a5, b, c);
        a6 = _mm256_fmadd_ps(a6, b, c); a7 = _mm256_fmadd_ps(a7, b, c);
        a8 = _mm256_fmadd_ps(a8, b, c); a9 = _mm256_fmadd_ps(a9, b, c);
    }
    __m256 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9;
    return s[0];
}
#endif

static void *
run(void *arg)
{
    job_t *j = arg;
    if (j->mode == 0) {
        long n = 1000000, total = 0;
        double t0 = now(), sink = 0;
        while (now() - t0 < j->seconds) {
#if defined(__x86_64__)
            if (j->lanes == 16) sink += fma512(n); else sink += fma256(n);
#endif
            total += n;
        }
        j->result = 2.0 * j->lanes * 10 * total / (now() - t0) / 1e9 + 0 * sink;
    }
    else {
        size_t n = (size_t)j->mib << 18; /* floats */
        /* Integer sums: associative, so the compiler vectorises the loop and
         * it is bound by memory, not by add latency. */
        unsigned *buf = malloc(n * sizeof(unsigned));
        memset(buf, 1, n * sizeof(unsigned));
        double best = 0;
        for (int rep = 0; rep < 5; rep++) {
            double t0 = now();
            unsigned s = 0;
            for (size_t i = 0; i < n; i++) {
                s += buf[i];
            }
            double gbs = n * 4.0 / (now() - t0) / 1e9;
            if (gbs > best && s != 7) best = gbs;
        }
        j->result = best;
        free(buf);
    }
    return NULL;
}

int
main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s fma|read THREADS SECONDS|MIB\n", argv[0]);
        return 2;
    }
    int mode = strcmp(argv[1], "read") == 0, nt = atoi(argv[2]), lanes = 8;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) lanes = 16;
    else if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) lanes = 0;
#else
    lanes = 0;
#endif
    if (mode == 0 && lanes == 0) { printf("0 none\n"); return 0; }
    pthread_t th[256];
    job_t jobs[256];
    for (int i = 0; i < nt; i++) {
        jobs[i] = (job_t){mode, atof(argv[3]), atol(argv[3]) / nt, 0, lanes};
        pthread_create(&th[i], NULL, run, &jobs[i]);
    }
    double total = 0;
    for (int i = 0; i < nt; i++) { pthread_join(th[i], NULL); total += jobs[i].result; }
    printf("%.2f %s\n", total, mode ? "read" : (lanes == 16 ? "avx512" : "avx2"));
    return 0;
}
