/*
 * runtime/pool.c - the CPU thread pool: pthreads, no OpenMP, no BLAS.  A job is
 * a count of independent tasks handed out through one atomic counter, and the
 * calling thread works too; a job ends when its tasks are done, without waiting
 * for workers that had not woken up by then.  Each task writes its own outputs,
 * so results do not depend on the number of threads.  After fork() the child
 * starts with no pool and builds one on first use.  A job that finds the pool
 * in use by another thread runs on its own caller's thread instead of waiting.
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "moe_impl.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Set from a signal handler (binding/module.c); checked between tasks. */
static atomic_int moe_interrupt_flag;
/* Whether this thread's ops honour it: only the thread that asked. */
static _Thread_local int moe_interrupt_watching;

void
moe_interrupt_request(void)
{
    atomic_store(&moe_interrupt_flag, 1);
}

void
moe_interrupt_watch(int on)
{
    moe_interrupt_watching = on;
    atomic_store(&moe_interrupt_flag, 0);
}

static int
moe_interrupt_pending(int watching)
{
    return watching &&
           atomic_load_explicit(&moe_interrupt_flag, memory_order_relaxed);
}

/* Run tasks [0, n) on this thread. */
static moe_status
moe_run_inline(int64_t n_tasks, moe_task_fn fn, void *ctx)
{
    int64_t t;

    for (t = 0; t < n_tasks; t++) {
        if (moe_interrupt_pending(moe_interrupt_watching)) {
            return moe_set_error(MOE_STATUS_INTERRUPTED, "interrupted");
        }
        fn(ctx, t);
    }
    return MOE_STATUS_OK;
}

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#define MOE_MAX_THREADS 256

typedef struct moe_pool {
    pthread_mutex_t run_lock;    /* held by the thread running a job        */
    pthread_mutex_t lock;        /* guards the fields below                 */
    pthread_cond_t  wake;        /* workers wait here for a new job         */
    pthread_cond_t  idle;        /* the caller waits here for the workers   */
    pthread_t       threads[MOE_MAX_THREADS];
    int             n_workers;   /* threads besides the caller              */
    /* written under lock; read without it while spinning */
    atomic_int      active;      /* workers that joined the current job and
                                    have not left it                        */
    int             open;        /* the current job still takes workers     */
    atomic_int      stop;
    atomic_ullong   generation;  /* bumped for each job                     */
    moe_task_fn     fn;
    void           *ctx;
    int64_t         n_tasks;
    atomic_llong    next;        /* next task to hand out                   */
    int             watching;    /* the job's caller honours interrupts     */
} moe_pool;

static moe_pool moe_the_pool;
static pthread_mutex_t moe_pool_init_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t moe_pool_once = PTHREAD_ONCE_INIT;
static int moe_pool_ready = 0;   /* mutexes of moe_the_pool initialised     */
static int moe_want_threads = 0; /* 0: not decided yet                      */

static void
moe_pool_work(moe_pool *p)
{
    for (;;) {
        long long t = atomic_fetch_add(&p->next, 1);
        if (t >= p->n_tasks || moe_interrupt_pending(p->watching)) {
            break;
        }
        p->fn(p->ctx, (int64_t)t);
    }
}

/*
 * Between jobs a worker (and the caller waiting for the workers) spins for
 * about 0.1 ms before sleeping on a condition variable: an op is several
 * short jobs, and waking a sleeping thread costs from ~10 us to, on a
 * virtual machine whose idle vCPU the host has parked, most of a
 * millisecond.  MOE_POOL_SPIN=<iterations> sets the spin (0: never spin,
 * e.g. with more threads than cores).
 */
static long moe_spin_iters = 4096;

static inline void
moe_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *
moe_pool_main(void *arg)
{
    moe_pool *p = &moe_the_pool;
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    long i;

    for (;;) {
        for (i = 0; i < moe_spin_iters &&
                    atomic_load_explicit(&p->generation,
                                         memory_order_acquire) == seen &&
                    !atomic_load_explicit(&p->stop, memory_order_relaxed);
             i++) {
            moe_cpu_relax();
        }
        pthread_mutex_lock(&p->lock);
        while (!p->stop && p->generation == seen) {
            pthread_cond_wait(&p->wake, &p->lock);
        }
        if (p->stop) {
            pthread_mutex_unlock(&p->lock);
            break;
        }
        seen = p->generation;
        if (!p->open) {
            /* woke after its caller had finished the job alone */
            pthread_mutex_unlock(&p->lock);
            continue;
        }
        p->active++;
        pthread_mutex_unlock(&p->lock);
        moe_pool_work(p);
        pthread_mutex_lock(&p->lock);
        if (--p->active == 0) {
            pthread_cond_signal(&p->idle);
        }
        pthread_mutex_unlock(&p->lock);
    }
    return NULL;
}

/* CPUs this process may run on (its affinity mask), at least 1. */
static int
moe_cpu_count(void)
{
    long n;
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) {
        return CPU_COUNT(&set);
    }
#endif
    n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static int
moe_default_threads(void)
{
    const char *env = getenv("MOE_NUM_THREADS");
    int n = moe_cpu_count();

    if (env != NULL && *env != '\0') {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 1) {
            n = v > MOE_MAX_THREADS ? MOE_MAX_THREADS : (int)v;
        }
    }
    return n > MOE_MAX_THREADS ? MOE_MAX_THREADS : n;
}

/* In the child of fork() no worker exists: forget the pool entirely. */
static void
moe_pool_atfork_child(void)
{
    memset(&moe_the_pool, 0, sizeof(moe_the_pool));
    moe_pool_ready = 0;
    pthread_mutex_init(&moe_pool_init_lock, NULL);
}

static void
moe_pool_atfork_prepare(void)
{
    pthread_mutex_lock(&moe_pool_init_lock);
}

static void
moe_pool_atfork_parent(void)
{
    pthread_mutex_unlock(&moe_pool_init_lock);
}

static void
moe_pool_register_atfork(void)
{
    pthread_atfork(moe_pool_atfork_prepare, moe_pool_atfork_parent,
                   moe_pool_atfork_child);
}

/* Stop the workers and start n - 1 new ones; run_lock must be held. */
static void
moe_pool_resize(moe_pool *p, int n)
{
    int i;
    uint64_t gen;

    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (i = 0; i < p->n_workers; i++) {
        pthread_join(p->threads[i], NULL);
    }
    pthread_mutex_lock(&p->lock);
    p->stop = 0;
    p->n_workers = 0;
    gen = p->generation;
    for (i = 0; i < n - 1; i++) {
        /* A worker starts having "seen" the current generation. */
        if (pthread_create(&p->threads[i], NULL, moe_pool_main,
                           (void *)(uintptr_t)gen) != 0) {
            break; /* run with the threads we could get */
        }
        p->n_workers++;
    }
    pthread_mutex_unlock(&p->lock);
}

/* The pool with its mutexes ready; *want gets the wanted thread count. */
static moe_pool *
moe_pool_get(int *want)
{
    moe_pool *p = &moe_the_pool;

    pthread_once(&moe_pool_once, moe_pool_register_atfork);
    pthread_mutex_lock(&moe_pool_init_lock);
    if (moe_want_threads == 0) {
        moe_want_threads = moe_default_threads();
    }
    if (!moe_pool_ready) {
        const char *spin = getenv("MOE_POOL_SPIN");
        if (spin != NULL && *spin != '\0') {
            char *end;
            long v = strtol(spin, &end, 10);
            if (*end == '\0' && v >= 0) {
                moe_spin_iters = v;
            }
        }
        pthread_mutex_init(&p->lock, NULL);
        pthread_mutex_init(&p->run_lock, NULL);
        pthread_cond_init(&p->wake, NULL);
        pthread_cond_init(&p->idle, NULL);
        moe_pool_ready = 1;
    }
    *want = moe_want_threads;
    pthread_mutex_unlock(&moe_pool_init_lock);
    return p;
}

moe_status
moe_set_num_threads(int n)
{
    int unused;

    if (n < 1 || n > MOE_MAX_THREADS) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "n_threads must be in "
                             "1..%d, got %d", MOE_MAX_THREADS, n);
    }
    (void)moe_pool_get(&unused);
    pthread_mutex_lock(&moe_pool_init_lock);
    moe_want_threads = n; /* the next job resizes the pool */
    pthread_mutex_unlock(&moe_pool_init_lock);
    return MOE_STATUS_OK;
}

int
moe_get_num_threads(void)
{
    int n;

    (void)moe_pool_get(&n);
    return n;
}

moe_status
moe_pool_run(int64_t n_tasks, moe_task_fn fn, void *ctx)
{
    moe_pool *p;
    int want;
    long i;
    moe_status st;

    if (n_tasks <= 0) {
        return MOE_STATUS_OK;
    }
    p = moe_pool_get(&want);
    if (n_tasks == 1 || want == 1 || pthread_mutex_trylock(&p->run_lock)) {
        return moe_run_inline(n_tasks, fn, ctx);
    }
    if (p->n_workers + 1 != want) {
        moe_pool_resize(p, want);
    }
    pthread_mutex_lock(&p->lock);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    p->watching = moe_interrupt_watching;
    p->open = 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);

    moe_pool_work(p);

    /* Every task is handed out: close the job, then wait only for the
     * workers inside it (running its last tasks).  One still asleep is not
     * waited for: waking a parked virtual CPU can take most of a
     * millisecond, longer than a decode step's whole job. */
    pthread_mutex_lock(&p->lock);
    p->open = 0;
    pthread_mutex_unlock(&p->lock);
    for (i = 0; i < moe_spin_iters &&
                atomic_load_explicit(&p->active, memory_order_acquire) > 0;
         i++) {
        moe_cpu_relax();
    }
    pthread_mutex_lock(&p->lock);
    while (p->active > 0) {
        pthread_cond_wait(&p->idle, &p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&p->run_lock);
    st = MOE_STATUS_OK;
    if (moe_interrupt_pending(moe_interrupt_watching)) {
        st = moe_set_error(MOE_STATUS_INTERRUPTED, "interrupted");
    }
    return st;
}

#else /* no pthreads: everything runs on the caller's thread */

moe_status
moe_set_num_threads(int n)
{
    if (n != 1) {
        return moe_set_error(MOE_STATUS_UNSUPPORTED, "this build has no "
                             "threads: n_threads must be 1, got %d", n);
    }
    return MOE_STATUS_OK;
}

int
moe_get_num_threads(void)
{
    return 1;
}

moe_status
moe_pool_run(int64_t n_tasks, moe_task_fn fn, void *ctx)
{
    return moe_run_inline(n_tasks, fn, ctx);
}

#endif
