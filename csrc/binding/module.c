/*
 * binding/module.c - the moe._C extension: the only file that includes Python.h
 * or NumPy headers.  It checks every array it is given (type, dtype, layout,
 * shape) so that no call from Python can reach the core with memory it does not
 * own, releases the GIL around the core, and maps moe_status to a Python
 * exception in one helper.  Friendlier conversion lives in moe/_api.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <string.h>

#include "moe.h"
#include "cuda/moe_cuda.h"

#if defined(__linux__)
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MOE_HAVE_SIGINT 1
#endif

/* ---- errors ------------------------------------------------------------ */

/* The one place a moe_status becomes a Python exception. */
static PyObject *
moe_raise(moe_status st)
{
    PyObject *type;

    if (st == MOE_STATUS_INTERRUPTED) {
        /* Python's own SIGINT handler ran too: let it raise. */
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
        PyErr_SetNone(PyExc_KeyboardInterrupt);
        return NULL;
    }
    switch (st) {
    case MOE_STATUS_INVALID_ARG:
    case MOE_STATUS_NONFINITE:   type = PyExc_ValueError; break;
    case MOE_STATUS_ALLOC:       type = PyExc_MemoryError; break;
    case MOE_STATUS_UNSUPPORTED: type = PyExc_NotImplementedError; break;
    default:                     type = PyExc_RuntimeError; break;
    }
    PyErr_Format(type, "%s (%s)", moe_last_error(), moe_status_str(st));
    return NULL;
}

/* ---- Ctrl-C ----------------------------------------------------------------- */

/*
 * While the main thread computes with the GIL released, Python cannot run
 * its SIGINT handler.  For the duration of the call we put ours in front:
 * it asks the core to stop between tasks and then calls Python's (which only
 * records the signal), so PyErr_CheckSignals() raises KeyboardInterrupt
 * afterwards.  Other threads leave the handler alone, and their calls are
 * not stopped by it.
 */
#ifdef MOE_HAVE_SIGINT
static struct sigaction moe_prev_sigint;

static void
moe_on_sigint(int sig, siginfo_t *info, void *uctx)
{
    moe_interrupt_request();
    if (moe_prev_sigint.sa_flags & SA_SIGINFO) {
        if (moe_prev_sigint.sa_sigaction != NULL) {
            moe_prev_sigint.sa_sigaction(sig, info, uctx);
        }
    }
    else if (moe_prev_sigint.sa_handler != SIG_DFL &&
             moe_prev_sigint.sa_handler != SIG_IGN) {
        moe_prev_sigint.sa_handler(sig);
    }
}

static int
moe_sigint_begin(void)
{
    struct sigaction ours, prev;

    if (syscall(SYS_gettid) != getpid()) {
        return 0; /* not the main thread */
    }
    if (sigaction(SIGINT, NULL, &prev) != 0 || prev.sa_handler == SIG_IGN) {
        return 0;
    }
    moe_prev_sigint = prev;
    moe_interrupt_watch(1);
    memset(&ours, 0, sizeof(ours));
    ours.sa_sigaction = moe_on_sigint;
    ours.sa_flags = SA_SIGINFO;
    sigemptyset(&ours.sa_mask);
    if (sigaction(SIGINT, &ours, NULL) != 0) {
        moe_interrupt_watch(0);
        return 0;
    }
    return 1;
}

static void
moe_sigint_end(int installed)
{
    if (installed) {
        sigaction(SIGINT, &moe_prev_sigint, NULL);
        moe_interrupt_watch(0);
    }
}
#else
static int moe_sigint_begin(void) { return 0; }
static void moe_sigint_end(int installed) { (void)installed; }
#endif

/* Run a core call with the GIL released and Ctrl-C honoured. */
#define MOE_COMPUTE(st, call)                                               \
    do {                                                                    \
        int moe_sig_ = moe_sigint_begin();                                  \
        Py_BEGIN_ALLOW_THREADS                                              \
        (st) = (call);                                                      \
        Py_END_ALLOW_THREADS                                                \
        moe_sigint_end(moe_sig_);                                           \
    } while (0)

/* ---- argument checks --------------------------------------------------- */

/*
 * Check that obj is a C-contiguous, aligned ndarray of the given type and
 * rank, and that each dims[i] >= 0 matches; dims[i] < 0 is filled in from the
 * array.  The error names the argument and the expected shape.  Returns a
 * borrowed pointer or NULL with an exception set.
 */
static PyArrayObject *
moe_arg(PyObject *obj, const char *name, int typenum, int ndim, npy_intp *dims,
        int writable)
{
    PyArrayObject *arr;
    int i, ok = 1;

    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s",
                     name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    arr = (PyArrayObject *)obj;
    if (PyArray_TYPE(arr) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", name,
                     (PyObject *)want, (PyObject *)PyArray_DESCR(arr));
        Py_XDECREF(want);
        return NULL;
    }
    if (!PyArray_ISCARRAY_RO(arr) || (writable && !PyArray_ISWRITEABLE(arr))) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous, aligned%s"
                     " array", name, writable ? ", writable" : "");
        return NULL;
    }
    if (PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d",
                     name, ndim, PyArray_NDIM(arr));
        return NULL;
    }
    for (i = 0; i < ndim; i++) {
        if (dims[i] >= 0 && dims[i] != PyArray_DIM(arr, i)) {
            ok = 0;
        }
    }
    if (!ok) {
        char want[160] = "", got[160] = "";
        for (i = 0; i < ndim; i++) {
            size_t n = strlen(want), m = strlen(got);
            snprintf(want + n, sizeof(want) - n, "%s%lld", i ? ", " : "",
                     (long long)dims[i]);
            snprintf(got + m, sizeof(got) - m, "%s%lld", i ? ", " : "",
                     (long long)PyArray_DIM(arr, i));
        }
        PyErr_Format(PyExc_ValueError, "%s must have shape (%s), got (%s)",
                     name, want, got);
        return NULL;
    }
    for (i = 0; i < ndim; i++) {
        dims[i] = PyArray_DIM(arr, i);
    }
    return arr;
}

/* Router logits: (n_tokens, n_experts) float64 with 1..2^31-1 experts. */
static PyArrayObject *
moe_logits_arg(PyObject *obj, npy_intp *ld)
{
    PyArrayObject *arr = moe_arg(obj, "logits", NPY_FLOAT64, 2, ld, 0);

    if (arr != NULL && (ld[1] < 1 || ld[1] > INT32_MAX)) {
        PyErr_Format(PyExc_ValueError, "logits must have 1..2^31-1 experts "
                     "(columns), got %lld", (long long)ld[1]);
        return NULL;
    }
    return arr;
}

/* Like moe_arg, but None gives a NULL data pointer and is not an error. */
static int
moe_opt_arg(PyObject *obj, const char *name, int typenum, int ndim,
            npy_intp *dims, void **data)
{
    PyArrayObject *arr;

    *data = NULL;
    if (obj == Py_None) {
        return 0;
    }
    arr = moe_arg(obj, name, typenum, ndim, dims, 0);
    if (arr == NULL) {
        return -1;
    }
    *data = PyArray_DATA(arr);
    return 0;
}

static PyArrayObject *
moe_new(int ndim, npy_intp d0, npy_intp d1, int typenum)
{
    npy_intp dims[2] = {d0, d1};
    return (PyArrayObject *)PyArray_SimpleNew(ndim, dims, typenum);
}

static int
moe_check_enum(long value, long n, const char *name)
{
    if (value < 0 || value >= n) {
        PyErr_Format(PyExc_ValueError, "%s code must be in 0..%ld, got %ld",
                     name, n - 1, value);
        return -1;
    }
    return 0;
}

#define MOE_DATA(arr, type) ((type *)PyArray_DATA((PyArrayObject *)(arr)))

/* ---- ops ------------------------------------------------------------- */

static PyObject *
moe_py_router_logits(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *w_obj;
    PyArrayObject *x, *w, *out = NULL;
    npy_intp xd[2] = {-1, -1}, wd[2] = {-1, -1};
    moe_router_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OO", &x_obj, &w_obj)) {
        return NULL;
    }
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    wd[1] = xd[1];
    if (!(w = moe_arg(w_obj, "router_weight", NPY_FLOAT32, 2, wd, 0))) {
        return NULL;
    }
    if (wd[0] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "router_weight has too many rows");
        return NULL;
    }
    if (!(out = moe_new(2, xd[0], wd[0], NPY_FLOAT64))) {
        return NULL;
    }
    p.x = MOE_DATA(x, float);
    p.weight = MOE_DATA(w, float);
    p.bias = NULL;
    p.n_tokens = xd[0];
    p.d_model = xd[1];
    p.n_experts = (int32_t)wd[0];
    p.logits = MOE_DATA(out, double);
    MOE_COMPUTE(st, moe_router_logits(&p));
    if (st != MOE_STATUS_OK) {
        Py_DECREF(out);
        return moe_raise(st);
    }
    return (PyObject *)out;
}

static PyObject *
moe_py_route(PyObject *self, PyObject *args)
{
    PyObject *logits_obj, *bias_obj, *allowed_obj = Py_None, *rows_obj = Py_None;
    PyArrayObject *logits;
    PyArrayObject *ids = NULL, *weights = NULL, *counts = NULL;
    npy_intp ld[2] = {-1, -1}, bd[1], ad[2], rd[1];
    void *rows;
    int top_k, scoring, renormalize, n_groups, topk_groups;
    double routed_scaling, capacity_factor, aux = 0.0, z = 0.0;
    long long n_dropped_ll;
    int64_t n_dropped = 0;
    void *bias, *allowed;
    moe_route_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OiipdOiid|OO", &logits_obj, &top_k, &scoring,
                          &renormalize, &routed_scaling, &bias_obj, &n_groups,
                          &topk_groups, &capacity_factor, &allowed_obj,
                          &rows_obj)) {
        return NULL;
    }
    if (!(logits = moe_logits_arg(logits_obj, ld))) {
        return NULL;
    }
    if (moe_check_enum(scoring, MOE_SCORING_COUNT, "scoring") < 0) {
        return NULL;
    }
    bd[0] = ld[1];
    if (moe_opt_arg(bias_obj, "expert_bias", NPY_FLOAT32, 1, bd, &bias) < 0) {
        return NULL;
    }
    /* numpy.bool_ is one byte, 0 or 1: the core reads it as uint8_t. */
    rd[0] = ld[0];
    if (moe_opt_arg(rows_obj, "groups", NPY_INT32, 1, rd, &rows) < 0) {
        return NULL;
    }
    /* with groups, allowed is a (G, E) table: one row per group */
    ad[0] = rows != NULL ? -1 : ld[0];
    ad[1] = ld[1];
    if (moe_opt_arg(allowed_obj, "allowed", NPY_BOOL, 2, ad, &allowed) < 0) {
        return NULL;
    }
    if (rows != NULL && allowed == NULL) {
        PyErr_SetString(PyExc_ValueError, "groups needs an allowed (G, E) table");
        return NULL;
    }
    if (top_k < 1 || top_k > ld[1]) {
        PyErr_Format(PyExc_ValueError, "top_k must be in 1..n_experts=%lld, "
                     "got %d", (long long)ld[1], top_k);
        return NULL;
    }
    ids = moe_new(2, ld[0], top_k, NPY_INT32);
    weights = moe_new(2, ld[0], top_k, NPY_FLOAT32);
    counts = moe_new(1, ld[1], 0, NPY_INT64);
    if (!ids || !weights || !counts) {
        goto fail;
    }
    p.logits = MOE_DATA(logits, double);
    p.opt.expert_bias = bias;
    p.opt.allowed = allowed;
    p.opt.mask_rows = rows;
    p.opt.n_mask_rows = rows != NULL ? ad[0] : 0;
    p.n_tokens = ld[0];
    p.n_experts = (int32_t)ld[1];
    p.opt.top_k = top_k;
    p.opt.n_groups = n_groups;
    p.opt.topk_groups = topk_groups;
    p.opt.scoring = (moe_scoring)scoring;
    p.opt.renormalize = renormalize;
    p.opt.routed_scaling = routed_scaling;
    p.opt.capacity_factor = capacity_factor;
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.weights = MOE_DATA(weights, float);
    p.counts = MOE_DATA(counts, int64_t);
    p.n_dropped = &n_dropped;
    p.aux_loss = &aux;
    p.z_loss = &z;
    MOE_COMPUTE(st, moe_route_topk(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    n_dropped_ll = (long long)n_dropped;
    return Py_BuildValue("NNNLdd", ids, weights, counts, n_dropped_ll, aux, z);
fail:
    Py_XDECREF(ids);
    Py_XDECREF(weights);
    Py_XDECREF(counts);
    return NULL;
}

/*
 * Expert choice, then the token-major view at the width the result needs
 * (the most experts any token got, at least 1), not at E.
 */
static PyObject *
moe_py_route_expert_choice(PyObject *self, PyObject *args)
{
    PyObject *logits_obj;
    PyArrayObject *logits;
    PyArrayObject *tok = NULL, *gates = NULL, *per_tok = NULL, *ids = NULL,
                  *weights = NULL;
    npy_intp ld[2] = {-1, -1}, t, width = 1;
    long long capacity;
    int scoring;
    int32_t *per;
    moe_expert_choice_params p;
    moe_ec_tokens_params q;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OLi", &logits_obj, &capacity, &scoring)) {
        return NULL;
    }
    if (!(logits = moe_logits_arg(logits_obj, ld))) {
        return NULL;
    }
    if (moe_check_enum(scoring, MOE_SCORING_COUNT, "scoring") < 0) {
        return NULL;
    }
    if (capacity < 0 || capacity > ld[0]) {
        PyErr_Format(PyExc_ValueError, "capacity must be in 0..n_tokens=%lld,"
                     " got %lld", (long long)ld[0], capacity);
        return NULL;
    }
    tok = moe_new(2, ld[1], (npy_intp)capacity, NPY_INT64);
    gates = moe_new(2, ld[1], (npy_intp)capacity, NPY_FLOAT32);
    per_tok = moe_new(1, ld[0], 0, NPY_INT32);
    if (!tok || !gates || !per_tok) {
        goto fail;
    }
    p.logits = MOE_DATA(logits, double);
    p.n_tokens = ld[0];
    p.n_experts = (int32_t)ld[1];
    p.capacity = capacity;
    p.scoring = (moe_scoring)scoring;
    p.token_ids = MOE_DATA(tok, int64_t);
    p.gates = MOE_DATA(gates, float);
    p.n_experts_per_token = MOE_DATA(per_tok, int32_t);
    MOE_COMPUTE(st, moe_route_expert_choice(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    per = MOE_DATA(per_tok, int32_t);
    for (t = 0; t < ld[0]; t++) {
        width = per[t] > width ? per[t] : width;
    }
    ids = moe_new(2, ld[0], width, NPY_INT32);
    weights = moe_new(2, ld[0], width, NPY_FLOAT32);
    if (!ids || !weights) {
        goto fail;
    }
    q.token_ids = p.token_ids;
    q.gates = p.gates;
    q.n_tokens = p.n_tokens;
    q.n_experts = p.n_experts;
    q.capacity = p.capacity;
    q.width = width;
    q.expert_ids = MOE_DATA(ids, int32_t);
    q.weights = MOE_DATA(weights, float);
    MOE_COMPUTE(st, moe_expert_choice_by_token(&q));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    return Py_BuildValue("NNNNN", tok, gates, per_tok, ids, weights);
fail:
    Py_XDECREF(tok);
    Py_XDECREF(gates);
    Py_XDECREF(per_tok);
    Py_XDECREF(ids);
    Py_XDECREF(weights);
    return NULL;
}

static PyObject *
moe_py_route_dynamic(PyObject *self, PyObject *args)
{
    PyObject *logits_obj;
    PyArrayObject *logits;
    PyArrayObject *ids = NULL, *weights = NULL, *n_sel = NULL;
    npy_intp ld[2] = {-1, -1};
    int mode, k_min, k_max, renormalize;
    double pval;
    moe_route_dynamic_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "Oidiip", &logits_obj, &mode, &pval, &k_min,
                          &k_max, &renormalize)) {
        return NULL;
    }
    if (!(logits = moe_logits_arg(logits_obj, ld))) {
        return NULL;
    }
    if (moe_check_enum(mode, 2, "mode") < 0) {
        return NULL;
    }
    if (k_max < 1 || k_max > ld[1]) {
        PyErr_Format(PyExc_ValueError, "k_max must be in 1..n_experts=%lld, "
                     "got %d", (long long)ld[1], k_max);
        return NULL;
    }
    ids = moe_new(2, ld[0], k_max, NPY_INT32);
    weights = moe_new(2, ld[0], k_max, NPY_FLOAT32);
    n_sel = moe_new(1, ld[0], 0, NPY_INT32);
    if (!ids || !weights || !n_sel) {
        goto fail;
    }
    p.logits = MOE_DATA(logits, double);
    p.n_tokens = ld[0];
    p.n_experts = (int32_t)ld[1];
    p.mode = (moe_dynamic_mode)mode;
    p.p = pval;
    p.k_min = k_min;
    p.k_max = k_max;
    p.renormalize = renormalize;
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.weights = MOE_DATA(weights, float);
    p.n_selected = MOE_DATA(n_sel, int32_t);
    MOE_COMPUTE(st, moe_route_dynamic(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    return Py_BuildValue("NNN", ids, weights, n_sel);
fail:
    Py_XDECREF(ids);
    Py_XDECREF(weights);
    Py_XDECREF(n_sel);
    return NULL;
}

/* In place on the caller's (fresh) arrays; returns the number skipped. */
static PyObject *
moe_py_route_skip(PyObject *self, PyObject *args)
{
    PyObject *ids_obj, *w_obj;
    PyArrayObject *ids, *w;
    npy_intp id[2] = {-1, -1};
    double threshold;
    int renormalize;
    int64_t n_skipped = 0;
    moe_route_skip_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OOdp", &ids_obj, &w_obj, &threshold,
                          &renormalize)) {
        return NULL;
    }
    if (!(ids = moe_arg(ids_obj, "expert_ids", NPY_INT32, 2, id, 1))) {
        return NULL;
    }
    if (!(w = moe_arg(w_obj, "weights", NPY_FLOAT32, 2, id, 1))) {
        return NULL;
    }
    if (id[1] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "expert_ids has too many columns");
        return NULL;
    }
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.weights = MOE_DATA(w, float);
    p.n_tokens = id[0];
    p.top_k = (int32_t)id[1];
    p.threshold = threshold;
    p.renormalize = renormalize;
    p.n_skipped = &n_skipped;
    MOE_COMPUTE(st, moe_route_skip(&p));
    if (st != MOE_STATUS_OK) {
        return moe_raise(st);
    }
    return PyLong_FromLongLong((long long)n_skipped);
}

static PyObject *
moe_py_update_expert_bias(PyObject *self, PyObject *args)
{
    PyObject *bias_obj, *counts_obj;
    PyArrayObject *bias, *counts;
    npy_intp bd[1] = {-1}, cd[1];
    double rate;

    if (!PyArg_ParseTuple(args, "OOd", &bias_obj, &counts_obj, &rate)) {
        return NULL;
    }
    if (!(bias = moe_arg(bias_obj, "bias", NPY_FLOAT64, 1, bd, 1))) {
        return NULL;
    }
    cd[0] = bd[0];
    if (!(counts = moe_arg(counts_obj, "counts", NPY_INT64, 1, cd, 0))) {
        return NULL;
    }
    if (bd[0] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bias is too long");
        return NULL;
    }
    moe_expert_bias_update(MOE_DATA(bias, double), MOE_DATA(counts, int64_t),
                           (int32_t)bd[0], rate);
    Py_RETURN_NONE;
}

static PyObject *
moe_py_dispatch(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *ids_obj;
    PyArrayObject *x, *ids;
    PyArrayObject *offsets = NULL, *token_index = NULL, *position = NULL;
    PyArrayObject *xs = NULL;
    npy_intp xd[2] = {-1, -1}, id[2] = {-1, -1};
    int n_experts;
    moe_dispatch_params p;
    moe_gather_params g;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OOi", &x_obj, &ids_obj, &n_experts)) {
        return NULL;
    }
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    id[0] = xd[0];
    if (!(ids = moe_arg(ids_obj, "expert_ids", NPY_INT32, 2, id, 0))) {
        return NULL;
    }
    if (n_experts < 1) {
        PyErr_Format(PyExc_ValueError, "n_experts must be >= 1, got %d",
                     n_experts);
        return NULL;
    }
    if (id[1] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "expert_ids has too many slots");
        return NULL;
    }
    offsets = moe_new(1, (npy_intp)n_experts + 1, 0, NPY_INT64);
    position = moe_new(2, id[0], id[1], NPY_INT64);
    if (!offsets || !position) {
        goto fail;
    }
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.n_tokens = id[0];
    p.top_k = (int32_t)id[1];
    p.n_experts = n_experts;
    p.offsets = MOE_DATA(offsets, int64_t);
    p.token_index = NULL;
    p.position = MOE_DATA(position, int64_t);
    MOE_COMPUTE(st, moe_dispatch_count(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    token_index = moe_new(1, (npy_intp)p.offsets[n_experts], 0, NPY_INT64);
    xs = moe_new(2, (npy_intp)p.offsets[n_experts], xd[1], NPY_FLOAT32);
    if (!token_index || !xs) {
        goto fail;
    }
    p.token_index = MOE_DATA(token_index, int64_t);
    g.x = MOE_DATA(x, float);
    g.token_index = p.token_index;
    g.n_tokens = xd[0];
    g.n_rows = p.offsets[n_experts];
    g.d_model = xd[1];
    g.out = MOE_DATA(xs, float);
    MOE_COMPUTE(st, moe_dispatch_build(&p));
    if (st == MOE_STATUS_OK) {
        MOE_COMPUTE(st, moe_dispatch_gather(&g));
    }
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    return Py_BuildValue("NNNN", xs, offsets, token_index, position);
fail:
    Py_XDECREF(offsets);
    Py_XDECREF(token_index);
    Py_XDECREF(position);
    Py_XDECREF(xs);
    return NULL;
}

static PyObject *
moe_py_combine(PyObject *self, PyObject *args)
{
    PyObject *y_obj, *pos_obj, *w_obj;
    PyArrayObject *y, *pos, *w, *out;
    npy_intp yd[2] = {-1, -1}, pd[2] = {-1, -1}, wd[2];
    moe_combine_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OOO", &y_obj, &pos_obj, &w_obj)) {
        return NULL;
    }
    if (!(y = moe_arg(y_obj, "y", NPY_FLOAT32, 2, yd, 0)) ||
        !(pos = moe_arg(pos_obj, "position", NPY_INT64, 2, pd, 0))) {
        return NULL;
    }
    wd[0] = pd[0];
    wd[1] = pd[1];
    if (!(w = moe_arg(w_obj, "weights", NPY_FLOAT32, 2, wd, 0))) {
        return NULL;
    }
    if (pd[1] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "position has too many slots");
        return NULL;
    }
    if (!(out = moe_new(2, pd[0], yd[1], NPY_FLOAT32))) {
        return NULL;
    }
    p.y = MOE_DATA(y, float);
    p.position = MOE_DATA(pos, int64_t);
    p.weights = MOE_DATA(w, float);
    p.n_rows = yd[0];
    p.n_tokens = pd[0];
    p.top_k = (int32_t)pd[1];
    p.d_model = yd[1];
    p.out = MOE_DATA(out, float);
    MOE_COMPUTE(st, moe_combine(&p));
    if (st != MOE_STATUS_OK) {
        Py_DECREF(out);
        return moe_raise(st);
    }
    return (PyObject *)out;
}

/* ---- packed experts ------------------------------------------------------ */

#define MOE_EXPERTS_CAPSULE "moe.experts"

static void
moe_experts_capsule_free(PyObject *capsule)
{
    moe_experts_free(PyCapsule_GetPointer(capsule, MOE_EXPERTS_CAPSULE));
}

/* A packed-weights capsule; linear: from pack_linear, else pack_experts. */
static const moe_experts *
moe_packed_arg(PyObject *obj, const char *name, int linear)
{
    const moe_experts *w = NULL;
    moe_experts_info info;

    if (PyCapsule_IsValid(obj, MOE_EXPERTS_CAPSULE)) {
        w = PyCapsule_GetPointer(obj, MOE_EXPERTS_CAPSULE);
        moe_experts_get_info(w, &info);
        if (info.linear == linear) {
            return w;
        }
    }
    PyErr_Format(PyExc_TypeError, "%s must be %s, got %s", name,
                 linear ? "a packed linear (from pack_linear)"
                        : "packed experts (from pack_experts)",
                 w != NULL ? (linear ? "packed experts" : "a packed linear")
                           : Py_TYPE(obj)->tp_name);
    return NULL;
}

static const moe_experts *
moe_experts_arg(PyObject *obj, const char *name)
{
    return moe_packed_arg(obj, name, 0);
}

/*
 * LoRA on experts: the capsule holds a reference to the experts' capsule
 * (its context), so the pack it was laid out for outlives it.
 */
#define MOE_LORA_CAPSULE "moe.expert_lora"

static void
moe_lora_capsule_free(PyObject *capsule)
{
    moe_expert_lora_free(PyCapsule_GetPointer(capsule, MOE_LORA_CAPSULE));
    Py_XDECREF((PyObject *)PyCapsule_GetContext(capsule));
}

/* None -> NULL; else an expert LoRA capsule. Returns -1 with an error. */
static int
moe_lora_arg(PyObject *obj, const moe_expert_lora **lora)
{
    *lora = NULL;
    if (obj == Py_None) {
        return 0;
    }
    if (!PyCapsule_IsValid(obj, MOE_LORA_CAPSULE)) {
        PyErr_Format(PyExc_TypeError, "lora must be packed expert LoRA (from "
                     "pack_expert_lora) or None, got %s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *lora = PyCapsule_GetPointer(obj, MOE_LORA_CAPSULE);
    return 0;
}

/*
 * pack_expert_lora(experts, rank, scaling, a_gate, b_gate, a_up, b_up,
 *                  a_down, b_down) -> capsule; each pair may be None.
 */
static PyObject *
moe_py_pack_expert_lora(PyObject *self, PyObject *args)
{
    PyObject *w_obj, *obj[6], *capsule;
    const char *names[6] = {"a_gate", "b_gate", "a_up", "b_up", "a_down",
                            "b_down"};
    void *data[6];
    npy_intp dims[6][3];
    const moe_experts *w;
    moe_experts_info info;
    moe_expert_lora_params p;
    moe_expert_lora *lora = NULL;
    moe_status st;
    int rank, i;
    float scaling;

    if (!PyArg_ParseTuple(args, "OifOOOOOO", &w_obj, &rank, &scaling, &obj[0],
                          &obj[1], &obj[2], &obj[3], &obj[4], &obj[5]) ||
        !(w = moe_experts_arg(w_obj, "experts"))) {
        return NULL;
    }
    if (rank < 1) {
        PyErr_Format(PyExc_ValueError, "rank must be >= 1, got %d", rank);
        return NULL;
    }
    moe_experts_get_info(w, &info);
    for (i = 0; i < 6; i++) {
        /* A: (E, r, in), B: (E, out, r); in/out: d_model or d_ff */
        int64_t in = i < 4 ? info.d_model : info.d_ff;
        int64_t outd = i < 4 ? info.d_ff : info.d_model;
        dims[i][0] = info.n_experts;
        dims[i][1] = i % 2 == 0 ? rank : outd;
        dims[i][2] = i % 2 == 0 ? in : rank;
        if (moe_opt_arg(obj[i], names[i], NPY_FLOAT32, 3, dims[i], &data[i]) <
            0) {
            return NULL;
        }
    }
    p.rank = rank;
    p.scaling = scaling;
    p.a_gate = data[0];
    p.b_gate = data[1];
    p.a_up = data[2];
    p.b_up = data[3];
    p.a_down = data[4];
    p.b_down = data[5];
    MOE_COMPUTE(st, moe_expert_lora_pack(&p, w, &lora));
    if (st != MOE_STATUS_OK) {
        return moe_raise(st);
    }
    capsule = PyCapsule_New(lora, MOE_LORA_CAPSULE, moe_lora_capsule_free);
    if (capsule == NULL) {
        moe_expert_lora_free(lora);
        return NULL;
    }
    Py_INCREF(w_obj);
    if (PyCapsule_SetContext(capsule, w_obj) != 0) {
        Py_DECREF(w_obj);
        Py_DECREF(capsule);
        return NULL;
    }
    return capsule;
}

static PyObject *
moe_py_pack_experts(PyObject *self, PyObject *args)
{
    PyObject *g_obj, *u_obj, *dn_obj;
    PyObject *bg_obj = Py_None, *bu_obj = Py_None, *bd_obj = Py_None;
    PyObject *ff_obj = Py_None;
    int bf16_compute = 0;
    npy_intp ffd[1];
    void *ff;
    PyArrayObject *up, *down;
    npy_intp ud[3] = {-1, -1, -1}, dd[3], gd[3], bgd[2], bdd[2];
    int dtype, typenum;
    void *gate, *bg, *bu, *bdn;
    moe_pack_params p;
    moe_experts *w = NULL;
    moe_status st;
    PyObject *capsule;

    if (!PyArg_ParseTuple(args, "OOOi|OOOOp", &g_obj, &u_obj, &dn_obj, &dtype,
                          &bg_obj, &bu_obj, &bd_obj, &ff_obj, &bf16_compute)) {
        return NULL;
    }
    if (moe_check_enum(dtype, MOE_DTYPE_COUNT, "dtype") < 0) {
        return NULL;
    }
    typenum = dtype == MOE_DTYPE_F32 ? NPY_FLOAT32 : NPY_UINT16;
    if (!(up = moe_arg(u_obj, "w_up", typenum, 3, ud, 0))) {
        return NULL;
    }
    if (ud[0] < 1 || ud[0] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "w_up must have 1..2^31-1 experts");
        return NULL;
    }
    memcpy(gd, ud, sizeof(gd));
    if (moe_opt_arg(g_obj, "w_gate", typenum, 3, gd, &gate) < 0) {
        return NULL;
    }
    dd[0] = ud[0];
    dd[1] = ud[2];
    dd[2] = ud[1];
    if (!(down = moe_arg(dn_obj, "w_down", typenum, 3, dd, 0))) {
        return NULL;
    }
    bgd[0] = ud[0];
    bgd[1] = ud[1];
    bdd[0] = ud[0];
    bdd[1] = ud[2];
    if (moe_opt_arg(bg_obj, "b_gate", NPY_FLOAT32, 2, bgd, &bg) < 0 ||
        moe_opt_arg(bu_obj, "b_up", NPY_FLOAT32, 2, bgd, &bu) < 0 ||
        moe_opt_arg(bd_obj, "b_down", NPY_FLOAT32, 2, bdd, &bdn) < 0) {
        return NULL;
    }
    if (bg != NULL && gate == NULL) {
        PyErr_SetString(PyExc_ValueError, "b_gate given without w_gate");
        return NULL;
    }
    ffd[0] = ud[0];
    if (moe_opt_arg(ff_obj, "expert_d_ff", NPY_INT64, 1, ffd, &ff) < 0) {
        return NULL;
    }
    p.expert_d_ff = ff;
    p.bf16_compute = bf16_compute;
    p.w_gate = gate;
    p.w_up = PyArray_DATA(up);
    p.w_down = PyArray_DATA(down);
    p.b_gate = bg;
    p.b_up = bu;
    p.b_down = bdn;
    p.dtype = (moe_dtype)dtype;
    p.n_experts = (int32_t)ud[0];
    p.d_model = ud[2];
    p.d_ff = ud[1];
    MOE_COMPUTE(st, moe_experts_pack(&p, &w));
    if (st != MOE_STATUS_OK) {
        return moe_raise(st);
    }
    capsule = PyCapsule_New(w, MOE_EXPERTS_CAPSULE, moe_experts_capsule_free);
    if (capsule == NULL) {
        moe_experts_free(w);
    }
    return capsule;
}

static PyObject *
moe_py_experts_info(PyObject *self, PyObject *obj)
{
    const moe_experts *w;
    moe_experts_info info;

    if (!PyCapsule_IsValid(obj, MOE_EXPERTS_CAPSULE)) {
        PyErr_Format(PyExc_TypeError, "experts must be packed weights (from "
                     "pack_experts or pack_linear), got %s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    w = PyCapsule_GetPointer(obj, MOE_EXPERTS_CAPSULE);
    moe_experts_get_info(w, &info);
    return Py_BuildValue("{s:i,s:L,s:L,s:i,s:i,s:i,s:i,s:n}", "n_experts",
                         (int)info.n_experts, "d_model",
                         (long long)info.d_model, "d_ff",
                         (long long)info.d_ff, "gated", (int)info.gated,
                         "linear", (int)info.linear, "dtype", (int)info.dtype,
                         "bf16_compute", (int)info.bf16_compute,
                         "nbytes", (Py_ssize_t)info.nbytes);
}

static PyObject *
moe_py_ffn_grouped(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *ti_obj, *off_obj, *w_obj;
    PyArrayObject *x, *off, *out;
    npy_intp xd[2] = {-1, -1}, od[1], td[1] = {-1};
    const moe_experts *w;
    moe_experts_info info;
    int activation;
    float alpha = 1.702f, limit = 7.0f;
    void *ti;
    moe_ffn_params p;
    moe_status st;

    PyObject *lora_obj = Py_None;

    if (!PyArg_ParseTuple(args, "OOOOi|ffO", &x_obj, &ti_obj, &off_obj, &w_obj,
                          &activation, &alpha, &limit, &lora_obj)) {
        return NULL;
    }
    if (moe_lora_arg(lora_obj, &p.lora) < 0) {
        return NULL;
    }
    if (moe_check_enum(activation, MOE_ACTIVATION_COUNT, "activation") < 0 ||
        !(w = moe_experts_arg(w_obj, "experts"))) {
        return NULL;
    }
    moe_experts_get_info(w, &info);
    xd[1] = info.d_model;
    od[0] = (npy_intp)info.n_experts + 1;
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0)) ||
        !(off = moe_arg(off_obj, "offsets", NPY_INT64, 1, od, 0)) ||
        moe_opt_arg(ti_obj, "token_index", NPY_INT64, 1, td, &ti) < 0) {
        return NULL;
    }
    p.x = MOE_DATA(x, float);
    p.token_index = ti;
    p.n_tokens = xd[0];
    p.offsets = MOE_DATA(off, int64_t);
    p.n_rows = ti != NULL ? td[0] : xd[0];
    p.experts = w;
    p.act.activation = (moe_activation)activation;
    p.act.alpha = alpha;
    p.act.limit = limit;
    if (!(out = moe_new(2, p.n_rows, xd[1], NPY_FLOAT32))) {
        return NULL;
    }
    p.out = MOE_DATA(out, float);
    MOE_COMPUTE(st, moe_ffn_grouped(&p));
    if (st != MOE_STATUS_OK) {
        Py_DECREF(out);
        return moe_raise(st);
    }
    return (PyObject *)out;
}

static PyObject *
moe_py_pack_linear(PyObject *self, PyObject *args)
{
    PyObject *w_obj, *b_obj = Py_None, *capsule;
    PyArrayObject *w;
    npy_intp wd[3] = {-1, -1, -1}, bd[2];
    int dtype;
    void *bias;
    moe_linear_pack_params p;
    moe_experts *packed = NULL;
    moe_status st;

    if (!PyArg_ParseTuple(args, "Oi|O", &w_obj, &dtype, &b_obj)) {
        return NULL;
    }
    if (moe_check_enum(dtype, MOE_DTYPE_COUNT, "dtype") < 0 ||
        !(w = moe_arg(w_obj, "w", dtype == MOE_DTYPE_F32 ? NPY_FLOAT32
                                                          : NPY_UINT16,
                      3, wd, 0))) {
        return NULL;
    }
    if (wd[0] < 1 || wd[0] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "w must have 1..2^31-1 groups");
        return NULL;
    }
    bd[0] = wd[0];
    bd[1] = wd[1];
    if (moe_opt_arg(b_obj, "bias", NPY_FLOAT32, 2, bd, &bias) < 0) {
        return NULL;
    }
    p.w = PyArray_DATA(w);
    p.dtype = (moe_dtype)dtype;
    p.n_groups = (int32_t)wd[0];
    p.d_out = wd[1];
    p.d_in = wd[2];
    p.bias = bias;
    MOE_COMPUTE(st, moe_linear_pack(&p, &packed));
    if (st != MOE_STATUS_OK) {
        return moe_raise(st);
    }
    capsule = PyCapsule_New(packed, MOE_EXPERTS_CAPSULE,
                            moe_experts_capsule_free);
    if (capsule == NULL) {
        moe_experts_free(packed);
    }
    return capsule;
}

static PyObject *
moe_py_linear_grouped(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *ti_obj, *off_obj, *w_obj;
    PyArrayObject *x, *off, *out;
    npy_intp xd[2] = {-1, -1}, od[1], td[1] = {-1};
    const moe_experts *w;
    moe_experts_info info;
    void *ti;
    moe_linear_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OOOO", &x_obj, &ti_obj, &off_obj, &w_obj) ||
        !(w = moe_packed_arg(w_obj, "weights", 1))) {
        return NULL;
    }
    moe_experts_get_info(w, &info);
    xd[1] = info.d_ff;
    od[0] = (npy_intp)info.n_experts + 1;
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0)) ||
        !(off = moe_arg(off_obj, "offsets", NPY_INT64, 1, od, 0)) ||
        moe_opt_arg(ti_obj, "token_index", NPY_INT64, 1, td, &ti) < 0) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.x = MOE_DATA(x, float);
    p.token_index = ti;
    p.n_tokens = xd[0];
    p.offsets = MOE_DATA(off, int64_t);
    p.n_rows = ti != NULL ? td[0] : xd[0];
    p.weights = w;
    if (!(out = moe_new(2, p.n_rows, info.d_model, NPY_FLOAT32))) {
        return NULL;
    }
    p.out = MOE_DATA(out, float);
    MOE_COMPUTE(st, moe_linear_grouped(&p));
    if (st != MOE_STATUS_OK) {
        Py_DECREF(out);
        return moe_raise(st);
    }
    return (PyObject *)out;
}

/*
 * lora_forward(x, base, kind, lora_a, bank, n_adapters, ids, weights,
 *              scaling, adapter_scaling, select_k, select_signed, rank_bias)
 *   -> (out, selected or None, counts)
 */
static PyObject *
moe_py_lora_forward(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *base_obj, *a_obj, *bank_obj, *ids_obj, *w_obj;
    PyObject *as_obj, *rb_obj;
    PyArrayObject *x, *out = NULL, *sel = NULL, *counts = NULL;
    npy_intp xd[2] = {-1, -1}, id[2] = {-1, -1}, wd[2], ad[1], rd[1];
    moe_experts_info binfo;
    int kind, n_adapters, select_k, select_signed;
    float scaling;
    void *ids, *weights, *ascale, *rbias;
    moe_experts_info ainfo;
    moe_lora_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OOiOOiOOfOiiO", &x_obj, &base_obj, &kind,
                          &a_obj, &bank_obj, &n_adapters, &ids_obj, &w_obj,
                          &scaling, &as_obj, &select_k, &select_signed,
                          &rb_obj)) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    if (moe_check_enum(kind, 3, "kind") < 0 ||
        !(p.lora_a = moe_packed_arg(a_obj, "lora_a", 1)) ||
        (base_obj != Py_None &&
         !(p.base = moe_packed_arg(base_obj, "base", 1)))) {
        return NULL;
    }
    if (n_adapters < 1) {
        PyErr_Format(PyExc_ValueError, "n_adapters must be >= 1, got %d",
                     n_adapters);
        return NULL;
    }
    moe_experts_get_info(p.lora_a, &ainfo);
    xd[1] = ainfo.d_ff;
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    if (!(p.bank = moe_packed_arg(bank_obj, "bank", 1))) {
        return NULL;
    }
    moe_experts_get_info(p.bank, &binfo);
    if (moe_opt_arg(ids_obj, "ids", NPY_INT32, 2, id, &ids) < 0) {
        return NULL;
    }
    if (ids != NULL && id[0] != xd[0]) {
        PyErr_Format(PyExc_ValueError, "ids must have n_tokens=%lld rows, "
                     "got %lld", (long long)xd[0], (long long)id[0]);
        return NULL;
    }
    if (ids == NULL && select_k <= 0) {
        PyErr_SetString(PyExc_ValueError, "ids are required without "
                        "rank selection");
        return NULL;
    }
    wd[0] = xd[0];
    wd[1] = ids != NULL ? id[1] : select_k;
    ad[0] = n_adapters;
    rd[0] = ainfo.d_model;
    if (moe_opt_arg(w_obj, "weights", NPY_FLOAT32, 2, wd, &weights) < 0 ||
        moe_opt_arg(as_obj, "adapter_scaling", NPY_FLOAT32, 1, ad,
                    &ascale) < 0 ||
        moe_opt_arg(rb_obj, "rank_bias", NPY_FLOAT32, 1, rd, &rbias) < 0) {
        return NULL;
    }
    if (select_k > 0 && (select_k > ainfo.d_model || ids != NULL)) {
        PyErr_Format(PyExc_ValueError, "top_k must be in 1..rank=%lld with "
                     "no ids given, got %d", (long long)ainfo.d_model,
                     select_k);
        return NULL;
    }
    p.x = MOE_DATA(x, float);
    p.n_tokens = xd[0];
    p.d_in = xd[1];
    p.d_out = binfo.d_model;
    p.rank = (int32_t)ainfo.d_model;
    p.kind = (moe_lora_kind)kind;
    p.n_adapters = n_adapters;
    p.n_slots = (int32_t)wd[1];
    p.ids = ids;
    p.weights = weights;
    p.scaling = scaling;
    p.adapter_scaling = ascale;
    p.select_k = select_k > 0 ? select_k : 0;
    p.select_signed = select_signed;
    p.rank_bias = rbias;
    out = moe_new(2, xd[0], binfo.d_model, NPY_FLOAT32);
    counts = moe_new(1, kind == MOE_LORA_RANKS ? ainfo.d_model : n_adapters,
                     0, NPY_INT64);
    if (!out || !counts) {
        goto fail;
    }
    if (select_k > 0) {
        if (!(sel = moe_new(2, xd[0], select_k, NPY_INT32))) {
            goto fail;
        }
        p.selected = MOE_DATA(sel, int32_t);
    }
    p.counts = MOE_DATA(counts, int64_t);
    p.out = MOE_DATA(out, float);
    MOE_COMPUTE(st, moe_lora_forward(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    if (sel == NULL) {
        Py_INCREF(Py_None);
        sel = (PyArrayObject *)Py_None;
    }
    return Py_BuildValue("NNN", out, sel, counts);
fail:
    Py_XDECREF(out);
    Py_XDECREF(sel);
    Py_XDECREF(counts);
    return NULL;
}

static PyObject *
moe_py_layer_forward(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *r_obj, *w_obj, *bias_obj, *sw_obj, *sgate_obj;
    PyObject *rbias_obj = Py_None;
    PyArrayObject *x, *r;
    PyArrayObject *out = NULL, *ids = NULL, *weights = NULL, *counts = NULL;
    npy_intp xd[2] = {-1, -1}, rd[2], bd[1], gd[1];
    int top_k, activation, scoring, renormalize, n_groups, topk_groups;
    double routed_scaling, capacity_factor, aux = 0.0, z = 0.0;
    float alpha = 1.702f, limit = 7.0f;
    int64_t n_dropped = 0;
    long long n_dropped_ll;
    void *tmp;
    moe_experts_info info;
    moe_layer_params p;
    moe_status st;

    PyObject *lora_obj = Py_None, *nk_obj = Py_None, *nv_obj = Py_None;
    PyObject *al_obj = Py_None, *gr_obj = Py_None;
    int router = MOE_ROUTER_TOP_K, k_min = 1, width = 0;
    double router_p = 0.0;
    double skip_threshold = 0.0;
    int skip_renorm = 0;
    int64_t n_skipped = 0;
    PyArrayObject *n_real = NULL, *out_norm = NULL;
    npy_intp nkd[1] = {-1}, nvd[2], ald[2], grd[1];
    int want_norm = 0;

    if (!PyArg_ParseTuple(args, "OOOiiOipdiidOO|OffOOOOOpididp", &x_obj, &r_obj,
                          &w_obj, &top_k, &activation, &bias_obj, &scoring,
                          &renormalize, &routed_scaling, &n_groups,
                          &topk_groups, &capacity_factor, &sw_obj,
                          &sgate_obj, &rbias_obj, &alpha, &limit,
                          &lora_obj, &nk_obj, &nv_obj, &al_obj, &gr_obj,
                          &want_norm, &router, &router_p, &k_min,
                          &skip_threshold, &skip_renorm)) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    if (moe_lora_arg(lora_obj, &p.lora) < 0) {
        return NULL;
    }
    if (moe_check_enum(activation, MOE_ACTIVATION_COUNT, "activation") < 0 ||
        moe_check_enum(scoring, MOE_SCORING_COUNT, "scoring") < 0 ||
        moe_check_enum(router, MOE_ROUTER_COUNT, "router") < 0 ||
        !(p.experts = moe_experts_arg(w_obj, "experts"))) {
        return NULL;
    }
    if (sw_obj != Py_None &&
        !(p.shared = moe_experts_arg(sw_obj, "shared_experts"))) {
        return NULL;
    }
    moe_experts_get_info(p.experts, &info);
    xd[1] = info.d_model;
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    if (moe_opt_arg(nk_obj, "null_kinds", NPY_INT32, 1, nkd, &tmp) < 0) {
        return NULL;
    }
    p.null_kinds = tmp;
    p.n_null = tmp != NULL ? (int32_t)nkd[0] : 0;
    if (p.n_null > INT32_MAX - info.n_experts) {
        PyErr_SetString(PyExc_ValueError, "too many null experts");
        return NULL;
    }
    nvd[0] = p.n_null;
    nvd[1] = xd[1];
    if (moe_opt_arg(nv_obj, "null_values", NPY_FLOAT32, 2, nvd, &tmp) < 0) {
        return NULL;
    }
    p.null_values = tmp;
    rd[0] = (npy_intp)info.n_experts + p.n_null;
    rd[1] = xd[1];
    if (!(r = moe_arg(r_obj, "router_weight", NPY_FLOAT32, 2, rd, 0))) {
        return NULL;
    }
    bd[0] = rd[0];
    gd[0] = xd[1];
    if (moe_opt_arg(bias_obj, "expert_bias", NPY_FLOAT32, 1, bd, &tmp) < 0) {
        return NULL;
    }
    p.route.expert_bias = tmp;
    if (moe_opt_arg(sgate_obj, "shared_gate_weight", NPY_FLOAT32, 1, gd,
                    &tmp) < 0) {
        return NULL;
    }
    p.shared_gate = tmp;
    if (moe_opt_arg(rbias_obj, "router_bias", NPY_FLOAT32, 1, bd, &tmp) < 0) {
        return NULL;
    }
    p.router_bias = tmp;
    grd[0] = xd[0];
    if (moe_opt_arg(gr_obj, "groups", NPY_INT32, 1, grd, &tmp) < 0) {
        return NULL;
    }
    p.route.mask_rows = tmp;
    ald[0] = p.route.mask_rows != NULL ? -1 : xd[0];
    ald[1] = rd[0];
    if (moe_opt_arg(al_obj, "allowed", NPY_BOOL, 2, ald, &tmp) < 0) {
        return NULL;
    }
    p.route.allowed = tmp;
    p.route.n_mask_rows = p.route.mask_rows != NULL ? ald[0] : 0;
    if (p.route.mask_rows != NULL && p.route.allowed == NULL) {
        PyErr_SetString(PyExc_ValueError, "groups needs an allowed (G, E) table");
        return NULL;
    }
    p.act.alpha = alpha;
    p.act.limit = limit;
    if (top_k < 1 || top_k > rd[0]) {
        PyErr_Format(PyExc_ValueError, "top_k must be in 1..n_experts=%lld, "
                     "got %d", (long long)rd[0], top_k);
        return NULL;
    }
    /* expert choice: up to every expert per token; the core says how many
     * it used (width) and writes (T, width) at the buffers' start */
    width = router == MOE_ROUTER_EXPERT_CHOICE ? (int)rd[0] : top_k;
    ids = moe_new(2, xd[0], width, NPY_INT32);
    weights = moe_new(2, xd[0], width, NPY_FLOAT32);
    out = moe_new(2, xd[0], xd[1], NPY_FLOAT32);
    counts = moe_new(1, rd[0], 0, NPY_INT64);
    if (!out || !ids || !weights || !counts) {
        goto fail;
    }
    if (p.n_null > 0) {
        if (!(n_real = moe_new(1, xd[0], 0, NPY_INT32))) {
            goto fail;
        }
        p.n_real = MOE_DATA(n_real, int32_t);
    }
    if (want_norm) {
        if (!(out_norm = moe_new(1, info.n_experts, 0, NPY_FLOAT64))) {
            goto fail;
        }
        p.out_norm = MOE_DATA(out_norm, double);
    }
    p.x = MOE_DATA(x, float);
    p.n_tokens = xd[0];
    p.d_model = xd[1];
    p.n_experts = info.n_experts;
    p.route.top_k = top_k;
    p.act.activation = (moe_activation)activation;
    p.router_weight = MOE_DATA(r, float);
    p.route.scoring = (moe_scoring)scoring;
    p.route.renormalize = renormalize;
    p.route.routed_scaling = routed_scaling;
    p.route.n_groups = n_groups;
    p.route.topk_groups = topk_groups;
    p.route.capacity_factor = capacity_factor;
    p.route.router = (moe_router)router;
    p.route.router_p = router_p;
    p.route.k_min = k_min;
    p.width = &width;
    p.out = MOE_DATA(out, float);
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.weights = MOE_DATA(weights, float);
    p.counts = MOE_DATA(counts, int64_t);
    p.n_dropped = &n_dropped;
    p.aux_loss = &aux;
    p.z_loss = &z;
    p.skip_threshold = skip_threshold;
    p.skip_renormalize = skip_renorm;
    p.n_skipped = &n_skipped;
    MOE_COMPUTE(st, moe_layer_forward(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    if (width < PyArray_DIM(ids, 1)) {
        /* (T, width) written densely at the buffers' start: copy that out */
        PyArrayObject *i2 = moe_new(2, xd[0], width, NPY_INT32);
        PyArrayObject *w2 = moe_new(2, xd[0], width, NPY_FLOAT32);
        if (!i2 || !w2) {
            Py_XDECREF(i2);
            Py_XDECREF(w2);
            goto fail;
        }
        memcpy(PyArray_DATA(i2), PyArray_DATA(ids), PyArray_NBYTES(i2));
        memcpy(PyArray_DATA(w2), PyArray_DATA(weights), PyArray_NBYTES(w2));
        Py_SETREF(ids, i2);
        Py_SETREF(weights, w2);
    }
    /* skipped slots count as dropped assignments */
    n_dropped_ll = (long long)(n_dropped + n_skipped);
    if (n_real == NULL) {
        Py_INCREF(Py_None);
        n_real = (PyArrayObject *)Py_None;
    }
    if (out_norm == NULL) {
        Py_INCREF(Py_None);
        out_norm = (PyArrayObject *)Py_None;
    }
    return Py_BuildValue("NNNNLddNN", out, ids, weights, counts, n_dropped_ll,
                         aux, z, n_real, out_norm);
fail:
    Py_XDECREF(n_real);
    Py_XDECREF(out_norm);
    Py_XDECREF(out);
    Py_XDECREF(ids);
    Py_XDECREF(weights);
    Py_XDECREF(counts);
    return NULL;
}

/*
 * PEER: the sub-keys arrive as (n_key_sets, n, d_key / 2), one set shared by
 * the heads or one per head; the expert rows u (n^2, d), v (n^2, d_out).
 * With return_routing, also the ids and gates (T, n_heads, top_k).
 */
static PyObject *
moe_py_peer_forward(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *wq_obj, *k1_obj, *k2_obj, *u_obj, *v_obj;
    PyArrayObject *x, *wq, *k1, *k2, *u, *v;
    PyArrayObject *out = NULL, *ids = NULL, *gates = NULL;
    npy_intp xd[2] = {-1, -1}, qd[3] = {-1, -1, -1}, kd[3] = {-1, -1, -1};
    npy_intp ud[2], vd[2], rd[3];
    int top_k, activation, routing;
    moe_peer_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OOOOOOiip", &x_obj, &wq_obj, &k1_obj,
                          &k2_obj, &u_obj, &v_obj, &top_k, &activation,
                          &routing)) {
        return NULL;
    }
    if (moe_check_enum(activation, MOE_PEER_ACTIVATION_COUNT, "activation") < 0) {
        return NULL;
    }
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    qd[2] = xd[1];
    if (!(wq = moe_arg(wq_obj, "w_query", NPY_FLOAT32, 3, qd, 0))) {
        return NULL;
    }
    if (qd[0] < 1 || qd[0] > INT32_MAX || qd[1] < 2 || qd[1] % 2 != 0 ||
        qd[1] > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "w_query must have shape (n_heads >= 1,"
                     " d_key even >= 2, d_model), got (%lld, %lld, %lld)",
                     (long long)qd[0], (long long)qd[1], (long long)qd[2]);
        return NULL;
    }
    kd[2] = qd[1] / 2;
    if (!(k1 = moe_arg(k1_obj, "sub_keys_1", NPY_FLOAT32, 3, kd, 0))) {
        return NULL;
    }
    if (kd[0] != 1 && kd[0] != qd[0]) {
        PyErr_Format(PyExc_ValueError, "sub_keys_1 must have 1 (shared) or "
                     "n_heads=%lld (per head) key sets, got %lld",
                     (long long)qd[0], (long long)kd[0]);
        return NULL;
    }
    if (kd[1] < 1 || kd[1] > 46340) {
        PyErr_Format(PyExc_ValueError, "sub_keys_1 must have 1..46340 sub-keys"
                     " (n^2 experts), got %lld", (long long)kd[1]);
        return NULL;
    }
    if (!(k2 = moe_arg(k2_obj, "sub_keys_2", NPY_FLOAT32, 3, kd, 0))) {
        return NULL;
    }
    ud[0] = kd[1] * kd[1];
    ud[1] = xd[1];
    if (!(u = moe_arg(u_obj, "u", NPY_FLOAT32, 2, ud, 0))) {
        return NULL;
    }
    vd[0] = ud[0];
    vd[1] = -1;
    if (!(v = moe_arg(v_obj, "v", NPY_FLOAT32, 2, vd, 0))) {
        return NULL;
    }
    if (top_k < 1 || top_k > kd[1]) {
        PyErr_Format(PyExc_ValueError, "top_k must be in 1..n_sub_keys=%lld, "
                     "got %d", (long long)kd[1], top_k);
        return NULL;
    }
    if (vd[1] < 1 || xd[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "d_model and d_out must be >= 1");
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    out = moe_new(2, xd[0], vd[1], NPY_FLOAT32);
    if (!out) {
        goto fail;
    }
    if (routing) {
        rd[0] = xd[0];
        rd[1] = qd[0];
        rd[2] = top_k;
        ids = (PyArrayObject *)PyArray_SimpleNew(3, rd, NPY_INT32);
        gates = (PyArrayObject *)PyArray_SimpleNew(3, rd, NPY_FLOAT32);
        if (!ids || !gates) {
            goto fail;
        }
        p.expert_ids = MOE_DATA(ids, int32_t);
        p.gates = MOE_DATA(gates, float);
    }
    p.x = MOE_DATA(x, float);
    p.n_tokens = xd[0];
    p.d_model = xd[1];
    p.d_out = vd[1];
    p.n_heads = (int32_t)qd[0];
    p.d_key = (int32_t)qd[1];
    p.n_sub_keys = (int32_t)kd[1];
    p.top_k = top_k;
    p.n_key_sets = (int32_t)kd[0];
    p.w_query = MOE_DATA(wq, float);
    p.sub_keys_1 = MOE_DATA(k1, float);
    p.sub_keys_2 = MOE_DATA(k2, float);
    p.u = MOE_DATA(u, float);
    p.v = MOE_DATA(v, float);
    p.activation = (moe_peer_activation)activation;
    p.out = MOE_DATA(out, float);
    MOE_COMPUTE(st, moe_peer_forward(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    if (!routing) {
        return Py_BuildValue("NOO", out, Py_None, Py_None);
    }
    return Py_BuildValue("NNN", out, ids, gates);
fail:
    Py_XDECREF(out);
    Py_XDECREF(ids);
    Py_XDECREF(gates);
    return NULL;
}

/*
 * soft_moe_forward(x, phi, experts, slots_per_expert, activation, normalize,
 *                  scale, temperature, across, return_weights[, alpha, limit])
 * x (A, B, d): across=0: A groups of B tokens each (Soft MoE); across=1: B
 * groups of A tokens, group b = x[:, b] (Mixture of Tokens).  Returns (out
 * (A, B, d), dispatch (A, B, E*s) or None, combine (A, B, E*s) or None).
 */
static PyObject *
moe_py_soft_moe_forward(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *phi_obj, *w_obj;
    PyArrayObject *x, *phi, *out = NULL, *disp = NULL, *comb = NULL;
    npy_intp xd[3] = {-1, -1, -1}, pd[2], wd[3];
    int slots, activation, normalize, across, want;
    double scale, temperature;
    float alpha = 1.702f, limit = 7.0f;
    moe_experts_info info;
    moe_soft_moe_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "OOOiipddpp|ff", &x_obj, &phi_obj, &w_obj,
                          &slots, &activation, &normalize, &scale,
                          &temperature, &across, &want, &alpha, &limit)) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    if (moe_check_enum(activation, MOE_ACTIVATION_COUNT, "activation") < 0 ||
        !(p.experts = moe_experts_arg(w_obj, "experts"))) {
        return NULL;
    }
    moe_experts_get_info(p.experts, &info);
    if (slots < 1 || (int64_t)info.n_experts * slots > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "slots_per_expert must be in 1..%lld "
                     "(n_experts * slots < 2^31), got %d",
                     (long long)(INT32_MAX / info.n_experts), slots);
        return NULL;
    }
    xd[2] = info.d_model;
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 3, xd, 0))) {
        return NULL;
    }
    pd[0] = xd[2];
    pd[1] = (npy_intp)info.n_experts * slots;
    if (!(phi = moe_arg(phi_obj, "phi", NPY_FLOAT32, 2, pd, 0))) {
        return NULL;
    }
    out = (PyArrayObject *)PyArray_SimpleNew(3, xd, NPY_FLOAT32);
    if (!out) {
        goto fail;
    }
    if (want) {
        wd[0] = xd[0];
        wd[1] = xd[1];
        wd[2] = pd[1];
        disp = (PyArrayObject *)PyArray_SimpleNew(3, wd, NPY_FLOAT32);
        comb = (PyArrayObject *)PyArray_SimpleNew(3, wd, NPY_FLOAT32);
        if (!disp || !comb) {
            goto fail;
        }
        p.dispatch = MOE_DATA(disp, float);
        p.combine = MOE_DATA(comb, float);
    }
    p.x = MOE_DATA(x, float);
    p.n_groups = across ? xd[1] : xd[0];
    p.group_size = across ? xd[0] : xd[1];
    p.d_model = xd[2];
    p.grouping = across ? MOE_SOFT_GROUPS_STRIDED : MOE_SOFT_GROUPS_ROWS;
    p.phi = MOE_DATA(phi, float);
    p.n_experts = info.n_experts;
    p.slots_per_expert = slots;
    p.normalize = normalize;
    p.scale = scale;
    p.temperature = temperature;
    p.act.activation = (moe_activation)activation;
    p.act.alpha = alpha;
    p.act.limit = limit;
    p.out = MOE_DATA(out, float);
    MOE_COMPUTE(st, moe_soft_moe_forward(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    if (!want) {
        return Py_BuildValue("NOO", out, Py_None, Py_None);
    }
    return Py_BuildValue("NNN", out, disp, comb);
fail:
    Py_XDECREF(out);
    Py_XDECREF(disp);
    Py_XDECREF(comb);
    return NULL;
}

static PyObject *
moe_py_set_num_threads(PyObject *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    moe_status st;

    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %ld", n);
        return NULL;
    }
    st = moe_set_num_threads((int)n);
    if (st != MOE_STATUS_OK) {
        return moe_raise(st);
    }
    Py_RETURN_NONE;
}

static PyObject *
moe_py_get_num_threads(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(moe_get_num_threads());
}

static PyObject *
moe_py_build_info(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:i,s:O}", "version", MOE_VERSION,
                         "compiler", moe_build_compiler(), "cpu_features",
                         moe_cpu_features(), "isa", moe_cpu_isa(),
                         "threads", moe_get_num_threads(), "cuda",
                         moe_cuda_built() ? Py_True : Py_False);
}

/* cuda_info() -> {"built": bool, "devices": int, "reason": str} */
static PyObject *
moe_py_cuda_info(PyObject *self, PyObject *noargs)
{
    int devices = 0;

    Py_BEGIN_ALLOW_THREADS
    devices = moe_cuda_devices(); /* may initialise the driver: slow once */
    Py_END_ALLOW_THREADS
    return Py_BuildValue("{s:O,s:i,s:s}", "built",
                         moe_cuda_built() ? Py_True : Py_False, "devices",
                         devices, "reason", moe_cuda_unavailable_reason());
}

/*
 * cuda_route(logits, dtype, expert_bias, n_tokens, n_experts, top_k,
 *            n_groups, topk_groups, scoring, renormalize, routed_scaling,
 *            expert_ids, weights, stream): device pointers as ints, from
 *            moe/cuda.py, which checks the arrays they come from.
 */
static PyObject *
moe_py_cuda_route(PyObject *self, PyObject *args)
{
    unsigned long long logits, bias, ids, weights, stream;
    long long n_tokens;
    int dtype, n_experts, top_k, n_groups, topk_groups, scoring, renormalize;
    float scaling;
    moe_cuda_route_params p;
    moe_status st;

    if (!PyArg_ParseTuple(args, "KiKLiiiiiifKKK", &logits, &dtype, &bias,
                          &n_tokens, &n_experts, &top_k, &n_groups,
                          &topk_groups, &scoring, &renormalize, &scaling, &ids,
                          &weights, &stream)) {
        return NULL;
    }
    p.logits = (const void *)(uintptr_t)logits;
    p.dtype = dtype;
    p.expert_bias = (const float *)(uintptr_t)bias;
    p.n_tokens = n_tokens;
    p.n_experts = n_experts;
    p.top_k = top_k;
    p.n_groups = n_groups;
    p.topk_groups = topk_groups;
    p.scoring = scoring;
    p.renormalize = renormalize;
    p.routed_scaling = scaling;
    p.expert_ids = (int32_t *)(uintptr_t)ids;
    p.weights = (float *)(uintptr_t)weights;
    Py_BEGIN_ALLOW_THREADS
    st = moe_cuda_route(&p, (void *)(uintptr_t)stream);
    Py_END_ALLOW_THREADS
    if (st == MOE_STATUS_UNSUPPORTED) {
        return moe_raise(st);
    }
    if (st != MOE_STATUS_OK) {
        PyErr_Format(st == MOE_STATUS_INVALID_ARG ? PyExc_ValueError
                                                  : PyExc_RuntimeError,
                     "%s", moe_cuda_error());
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- module ----------------------------------------------------------- */

static PyMethodDef moe_methods[] = {
    {"router_logits", moe_py_router_logits, METH_VARARGS,
     "router_logits(x, router_weight) -> (T, E) float64"},
    {"route", moe_py_route, METH_VARARGS,
     "route(logits, top_k, scoring, renormalize, routed_scaling, "
     "expert_bias, n_groups, topk_groups, capacity_factor[, allowed])"},
    {"route_expert_choice", moe_py_route_expert_choice, METH_VARARGS,
     "route_expert_choice(logits, capacity, scoring) -> (token_ids, gates, "
     "n_experts_per_token, expert_ids, weights)"},
    {"route_dynamic", moe_py_route_dynamic, METH_VARARGS,
     "route_dynamic(logits, mode, p, k_min, k_max, renormalize) -> "
     "(expert_ids, weights, n_selected)"},
    {"route_skip", moe_py_route_skip, METH_VARARGS,
     "route_skip(expert_ids, weights, threshold, renormalize) -> n_skipped, "
     "in place"},
    {"update_expert_bias", moe_py_update_expert_bias, METH_VARARGS,
     "update_expert_bias(bias, counts, rate): in place"},
    {"dispatch", moe_py_dispatch, METH_VARARGS,
     "dispatch(x, expert_ids, n_experts) -> (x_sorted, offsets, "
     "token_index, position)"},
    {"combine", moe_py_combine, METH_VARARGS,
     "combine(y_sorted, position, weights) -> (T, d)"},
    {"pack_experts", moe_py_pack_experts, METH_VARARGS,
     "pack_experts(w_gate, w_up, w_down, dtype, b_gate=None, b_up=None, "
     "b_down=None, expert_d_ff=None, bf16_compute=False) -> packed experts"},
    {"experts_info", moe_py_experts_info, METH_O,
     "experts_info(packed) -> dict of sizes"},
    {"ffn_grouped", moe_py_ffn_grouped, METH_VARARGS,
     "ffn_grouped(x, token_index, offsets, packed, activation)"},
    {"pack_expert_lora", moe_py_pack_expert_lora, METH_VARARGS,
     "pack_expert_lora(experts, rank, scaling, a_gate, b_gate, a_up, b_up, "
     "a_down, b_down) -> packed LoRA on the experts"},
    {"pack_linear", moe_py_pack_linear, METH_VARARGS,
     "pack_linear(w, dtype[, bias]) -> packed linear"},
    {"linear_grouped", moe_py_linear_grouped, METH_VARARGS,
     "linear_grouped(x, token_index, offsets, packed) -> (n_rows, d_out)"},
    {"lora_forward", moe_py_lora_forward, METH_VARARGS,
     "lora_forward(x, base, kind, lora_a, bank, n_adapters, ids, weights, "
     "scaling, adapter_scaling, select_k, select_signed, rank_bias) -> "
     "(out, selected, counts)"},
    {"peer_forward", moe_py_peer_forward, METH_VARARGS,
     "peer_forward(x, w_query, sub_keys_1, sub_keys_2, u, v, top_k, "
     "activation, return_routing) -> (out, expert_ids, gates)"},
    {"set_num_threads", moe_py_set_num_threads, METH_O,
     "set_num_threads(n)"},
    {"get_num_threads", moe_py_get_num_threads, METH_NOARGS,
     "get_num_threads() -> int"},
    {"layer_forward", moe_py_layer_forward, METH_VARARGS,
     "layer_forward(...) -> (out, ids, weights, counts, n_dropped, aux, z)"},
    {"soft_moe_forward", moe_py_soft_moe_forward, METH_VARARGS,
     "soft_moe_forward(x, phi, experts, slots_per_expert, activation, "
     "normalize, scale, temperature, across, return_weights[, alpha, limit]) "
     "-> (out, dispatch, combine)"},
    {"build_info", moe_py_build_info, METH_NOARGS, "build information"},
    {"cuda_info", moe_py_cuda_info, METH_NOARGS,
     "cuda_info() -> {built, devices, reason}"},
    {"cuda_route", moe_py_cuda_route, METH_VARARGS,
     "cuda_route(...): the fused CUDA router on device pointers"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef moe_module = {
    PyModuleDef_HEAD_INIT, "moe._C",
    "C core of the moe package (use the moe package, not this module).", -1,
    moe_methods, NULL, NULL, NULL, NULL
};

/* ---- the option lists (csrc/moe_options.h), exported as tuples of names:
 * moe._C.ACTIVATIONS[i] is the name of enum value i; moe/ reads these. */

#define MOE_NAME_2_(name, str) str,
#define MOE_NAME_3_(name, str, x) str,
#define MOE_GATED_NAME_(name, str, gated) gated ? str : NULL,

static const char *const moe_activation_names[] = {
    MOE_ACTIVATION_LIST(MOE_NAME_3_) NULL};
static const char *const moe_gated_names[] = {
    MOE_ACTIVATION_LIST(MOE_GATED_NAME_) NULL};
static const char *const moe_scoring_names[] = {
    MOE_SCORING_LIST(MOE_NAME_2_) NULL};
static const char *const moe_dtype_names[] = {MOE_DTYPE_LIST(MOE_NAME_2_) NULL};
static const char *const moe_router_names[] = {
    MOE_ROUTER_LIST(MOE_NAME_2_) NULL};
static const char *const moe_null_names[] = {MOE_NULL_LIST(MOE_NAME_2_) NULL};
static const char *const moe_peer_activation_names[] = {
    MOE_PEER_ACTIVATION_LIST(MOE_NAME_2_) NULL};

/* Add tuple `attr` of the n names (NULL entries skipped) to module m. */
static int
moe_add_names(PyObject *m, const char *attr, const char *const *names, int n)
{
    PyObject *t, *s;
    Py_ssize_t k = 0;
    int i;

    for (i = 0; i < n; i++) {
        k += names[i] != NULL;
    }
    t = PyTuple_New(k);
    for (i = 0, k = 0; t != NULL && i < n; i++) {
        if (names[i] == NULL) {
            continue;
        }
        s = PyUnicode_FromString(names[i]);
        if (s == NULL) {
            Py_DECREF(t);
            return -1;
        }
        PyTuple_SET_ITEM(t, k++, s);
    }
    if (t == NULL || PyModule_AddObject(m, attr, t) < 0) {
        Py_XDECREF(t);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__C(void)
{
    PyObject *m;

    import_array();
    /* Read cpuid once here, while the GIL serialises first use. */
    (void)moe_cpu_features();
    (void)moe_cpu_isa();
    m = PyModule_Create(&moe_module);
    if (m == NULL ||
        moe_add_names(m, "ACTIVATIONS", moe_activation_names,
                      MOE_ACTIVATION_COUNT) < 0 ||
        moe_add_names(m, "GATED_ACTIVATIONS", moe_gated_names,
                      MOE_ACTIVATION_COUNT) < 0 ||
        moe_add_names(m, "SCORINGS", moe_scoring_names,
                      MOE_SCORING_COUNT) < 0 ||
        moe_add_names(m, "WEIGHT_DTYPES", moe_dtype_names,
                      MOE_DTYPE_COUNT) < 0 ||
        moe_add_names(m, "ROUTERS", moe_router_names, MOE_ROUTER_COUNT) < 0 ||
        moe_add_names(m, "NULL_KINDS", moe_null_names, MOE_NULL_COUNT) < 0 ||
        moe_add_names(m, "PEER_ACTIVATIONS", moe_peer_activation_names,
                      MOE_PEER_ACTIVATION_COUNT) < 0) {
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
