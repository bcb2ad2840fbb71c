/*
 * binding/ops.c - the wrappers of the public ops: router logits, routing
 * (top-k, expert choice, dynamic k, skipping, bias update), dispatch and
 * combine, packing experts and linears, the grouped FFN and linear, and the
 * CUDA router on device pointers.  Each parses its keywords, checks its
 * arguments with arrays.c, fills the op's params and ends in moe_outs_done.
 */
#include "binding.h"
#include "cuda/moe_cuda.h"

/* ---- routing ---------------------------------------------------------------- */

PyObject *
moe_py_router_logits(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "router_weight", NULL};
    PyObject *x_obj, *w_obj;
    PyArrayObject *x, *w;
    npy_intp xd[2] = {-1, -1}, wd[2] = {-1, -1};
    moe_outs o = MOE_OUTS(1);
    moe_router_params p;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:router_logits", kwlist,
                                     &x_obj, &w_obj) ||
        !(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    wd[1] = xd[1];
    if (!(w = moe_arg(w_obj, "router_weight", NPY_FLOAT32, 2, wd, 0)) ||
        moe_check_int32(wd[0], "router_weight has too many rows") < 0) {
        return NULL;
    }
    p.x = MOE_DATA(x, float);
    p.weight = MOE_DATA(w, float);
    p.bias = NULL;
    p.n_tokens = xd[0];
    p.d_model = xd[1];
    p.n_experts = (int32_t)wd[0];
    if (!(p.logits = moe_out(&o, 0, NPY_FLOAT64, 2, xd[0], wd[0], 0))) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_router_logits(&p));
    return moe_outs_done(&o, st, NULL);
}

/* route(logits, top_k, scoring, renormalize, *, routed_scaling, expert_bias,
 *       n_groups, topk_groups, capacity_factor, allowed, groups) */
/*
 * route's arguments (logits, top_k, scoring, renormalize, *, routed_scaling,
 * expert_bias, n_groups, topk_groups, capacity_factor, allowed, groups) into
 * p's logits, sizes and options (pointing into the argument arrays); 0, or
 * -1 with an exception set.  route_backward reads the same arguments.
 */
int
moe_route_parse(PyObject *args, PyObject *kw, moe_route_params *p)
{
    static char *kwlist[] = {"logits", "top_k", "scoring", "renormalize",
                             "routed_scaling", "expert_bias", "n_groups",
                             "topk_groups", "capacity_factor", "allowed",
                             "groups", NULL};
    PyObject *logits_obj, *bias_obj = Py_None, *allowed_obj = Py_None;
    PyObject *rows_obj = Py_None;
    npy_intp ld[2] = {-1, -1}, bd[1], ad[2], rd[1];
    int top_k, scoring, renormalize, n_groups = 1, topk_groups = 1;
    double routed_scaling = 1.0, capacity_factor = 0.0;
    void *bias, *allowed, *rows;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oiip|$dOiidOO:route", kwlist,
                                     &logits_obj, &top_k, &scoring,
                                     &renormalize, &routed_scaling, &bias_obj,
                                     &n_groups, &topk_groups, &capacity_factor,
                                     &allowed_obj, &rows_obj) ||
        !moe_logits_arg(logits_obj, ld) ||
        moe_check_enum(scoring, MOE_SCORING_COUNT, "scoring") < 0) {
        return -1;
    }
    bd[0] = ld[1];
    rd[0] = ld[0];
    if (moe_opt_arg(bias_obj, "expert_bias", NPY_FLOAT32, 1, bd, &bias) < 0 ||
        moe_opt_arg(rows_obj, "groups", NPY_INT32, 1, rd, &rows) < 0) {
        return -1;
    }
    /* with groups, allowed is a (G, E) table: one row per group; numpy.bool_
     * is one byte, 0 or 1: the core reads it as uint8_t */
    ad[0] = rows != NULL ? -1 : ld[0];
    ad[1] = ld[1];
    if (moe_opt_arg(allowed_obj, "allowed", NPY_BOOL, 2, ad, &allowed) < 0) {
        return -1;
    }
    if (rows != NULL && allowed == NULL) {
        PyErr_SetString(PyExc_ValueError, "groups needs an allowed (G, E) table");
        return -1;
    }
    if (moe_check_range(top_k, 1, ld[1], "top_k", "n_experts") < 0) {
        return -1;
    }
    memset(p, 0, sizeof(*p));
    p->logits = (const double *)PyArray_DATA((PyArrayObject *)logits_obj);
    p->n_tokens = ld[0];
    p->n_experts = (int32_t)ld[1];
    p->opt = (moe_route_options){
        .top_k = top_k, .scoring = (moe_scoring)scoring,
        .renormalize = renormalize, .routed_scaling = routed_scaling,
        .n_groups = n_groups, .topk_groups = topk_groups,
        .capacity_factor = capacity_factor, .expert_bias = bias,
        .allowed = allowed, .mask_rows = rows,
        .n_mask_rows = rows != NULL ? ad[0] : 0};
    return 0;
}

PyObject *
moe_py_route(PyObject *self, PyObject *args, PyObject *kw)
{
    double aux = 0.0, z = 0.0;
    int64_t n_dropped = 0;
    moe_outs o = MOE_OUTS(3);
    moe_route_params p;
    moe_status st;

    if (moe_route_parse(args, kw, &p) < 0) {
        return NULL;
    }
    p.n_dropped = &n_dropped;
    p.aux_loss = &aux;
    p.z_loss = &z;
    p.expert_ids = moe_out(&o, 0, NPY_INT32, 2, p.n_tokens, p.opt.top_k, 0);
    p.weights = moe_out(&o, 1, NPY_FLOAT32, 2, p.n_tokens, p.opt.top_k, 0);
    p.counts = moe_out(&o, 2, NPY_INT64, 1, p.n_experts, 0, 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_route_topk(&p));
    return moe_outs_done(&o, st, "(Ldd)", (long long)n_dropped, aux, z);
}

/*
 * Expert choice, then the token-major view at the width the result needs
 * (the most experts any token got, at least 1), not at E.
 */
PyObject *
moe_py_route_expert_choice(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"logits", "capacity", "scoring", NULL};
    PyObject *logits_obj;
    npy_intp ld[2] = {-1, -1}, t, width = 1;
    long long capacity;
    int scoring;
    moe_outs o = MOE_OUTS(5);
    moe_expert_choice_params p;
    moe_ec_tokens_params q;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLi:route_expert_choice",
                                     kwlist, &logits_obj, &capacity,
                                     &scoring) ||
        !moe_logits_arg(logits_obj, ld) ||
        moe_check_enum(scoring, MOE_SCORING_COUNT, "scoring") < 0 ||
        moe_check_range(capacity, 0, ld[0], "capacity", "n_tokens") < 0) {
        return NULL;
    }
    p.logits = (const double *)PyArray_DATA((PyArrayObject *)logits_obj);
    p.n_tokens = ld[0];
    p.n_experts = (int32_t)ld[1];
    p.capacity = capacity;
    p.scoring = (moe_scoring)scoring;
    p.token_ids = moe_out(&o, 0, NPY_INT64, 2, ld[1], capacity, 0);
    p.gates = moe_out(&o, 1, NPY_FLOAT32, 2, ld[1], capacity, 0);
    p.n_experts_per_token = moe_out(&o, 2, NPY_INT32, 1, ld[0], 0, 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_route_expert_choice(&p));
    if (st != MOE_STATUS_OK) {
        return moe_outs_done(&o, st, NULL);
    }
    for (t = 0; t < ld[0]; t++) {
        width = p.n_experts_per_token[t] > width ? p.n_experts_per_token[t]
                                                 : width;
    }
    q.token_ids = p.token_ids;
    q.gates = p.gates;
    q.n_tokens = p.n_tokens;
    q.n_experts = p.n_experts;
    q.capacity = p.capacity;
    q.width = width;
    q.expert_ids = moe_out(&o, 3, NPY_INT32, 2, ld[0], width, 0);
    q.weights = moe_out(&o, 4, NPY_FLOAT32, 2, ld[0], width, 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_expert_choice_by_token(&q));
    return moe_outs_done(&o, st, NULL);
}

PyObject *
moe_py_route_dynamic(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"logits", "mode", "p", "k_min", "k_max",
                             "renormalize", NULL};
    PyObject *logits_obj;
    npy_intp ld[2] = {-1, -1};
    int mode, k_min, k_max, renormalize;
    double pval;
    moe_outs o = MOE_OUTS(3);
    moe_route_dynamic_params p;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oidiip:route_dynamic", kwlist,
                                     &logits_obj, &mode, &pval, &k_min, &k_max,
                                     &renormalize) ||
        !moe_logits_arg(logits_obj, ld) ||
        moe_check_enum(mode, 2, "mode") < 0 ||
        moe_check_range(k_max, 1, ld[1], "k_max", "n_experts") < 0) {
        return NULL;
    }
    p.logits = (const double *)PyArray_DATA((PyArrayObject *)logits_obj);
    p.n_tokens = ld[0];
    p.n_experts = (int32_t)ld[1];
    p.mode = (moe_dynamic_mode)mode;
    p.p = pval;
    p.k_min = k_min;
    p.k_max = k_max;
    p.renormalize = renormalize;
    p.expert_ids = moe_out(&o, 0, NPY_INT32, 2, ld[0], k_max, 0);
    p.weights = moe_out(&o, 1, NPY_FLOAT32, 2, ld[0], k_max, 0);
    p.n_selected = moe_out(&o, 2, NPY_INT32, 1, ld[0], 0, 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_route_dynamic(&p));
    return moe_outs_done(&o, st, NULL);
}

/* In place on the caller's (fresh) arrays; returns the number skipped. */
PyObject *
moe_py_route_skip(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"expert_ids", "weights", "threshold",
                             "renormalize", NULL};
    PyObject *ids_obj, *w_obj;
    PyArrayObject *ids, *w;
    npy_intp id[2] = {-1, -1};
    int renormalize;
    int64_t n_skipped = 0;
    moe_outs o = MOE_OUTS(0);
    moe_route_skip_params p;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOdp:route_skip", kwlist,
                                     &ids_obj, &w_obj, &p.threshold,
                                     &renormalize) ||
        !(ids = moe_arg(ids_obj, "expert_ids", NPY_INT32, 2, id, 1)) ||
        !(w = moe_arg(w_obj, "weights", NPY_FLOAT32, 2, id, 1)) ||
        moe_check_int32(id[1], "expert_ids has too many columns") < 0) {
        return NULL;
    }
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.weights = MOE_DATA(w, float);
    p.n_tokens = id[0];
    p.top_k = (int32_t)id[1];
    p.renormalize = renormalize;
    p.n_skipped = &n_skipped;
    MOE_COMPUTE(st, moe_route_skip(&p));
    return moe_outs_done(&o, st, "L", (long long)n_skipped);
}

PyObject *
moe_py_update_expert_bias(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"bias", "counts", "rate", NULL};
    PyObject *bias_obj, *counts_obj;
    PyArrayObject *bias, *counts;
    npy_intp bd[1] = {-1}, cd[1];
    double rate;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOd:update_expert_bias",
                                     kwlist, &bias_obj, &counts_obj, &rate) ||
        !(bias = moe_arg(bias_obj, "bias", NPY_FLOAT64, 1, bd, 1))) {
        return NULL;
    }
    cd[0] = bd[0];
    if (!(counts = moe_arg(counts_obj, "counts", NPY_INT64, 1, cd, 0)) ||
        moe_check_int32(bd[0], "bias is too long") < 0) {
        return NULL;
    }
    /* O(n_experts): not worth releasing the GIL */
    moe_expert_bias_update(MOE_DATA(bias, double), MOE_DATA(counts, int64_t),
                           (int32_t)bd[0], rate);
    Py_RETURN_NONE;
}

/* CUDA top-k routing on device pointers (ints), from moe/cuda.py, which
 * checks the tensors they come from. */
PyObject *
moe_py_cuda_route(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"logits", "dtype", "n_tokens", "n_experts",
                             "top_k", "scoring", "renormalize", "expert_ids",
                             "weights", "stream", "expert_bias", "n_groups",
                             "topk_groups", "routed_scaling", NULL};
    unsigned long long logits, ids, weights, stream, bias = 0;
    long long n_tokens;
    int dtype, n_experts, top_k, scoring, renormalize;
    int n_groups = 1, topk_groups = 1;
    float scaling = 1.0f;
    moe_cuda_route_params p;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "KiLiiiiKKK|$Kiif:cuda_route",
                                     kwlist, &logits, &dtype, &n_tokens,
                                     &n_experts, &top_k, &scoring,
                                     &renormalize, &ids, &weights, &stream,
                                     &bias, &n_groups, &topk_groups,
                                     &scaling)) {
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

/* ---- dispatch and combine ------------------------------------------------- */

/* dispatch(x, expert_ids, n_experts) -> (x_sorted, offsets, token_index,
 * position): count first, to size token_index and x_sorted. */
PyObject *
moe_py_dispatch(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "expert_ids", "n_experts", NULL};
    PyObject *x_obj, *ids_obj;
    PyArrayObject *x, *ids;
    npy_intp xd[2] = {-1, -1}, id[2] = {-1, -1};
    int n_experts;
    moe_outs o = MOE_OUTS(4);
    moe_dispatch_params p;
    moe_gather_params g;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOi:dispatch", kwlist, &x_obj,
                                     &ids_obj, &n_experts) ||
        !(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    id[0] = xd[0];
    if (!(ids = moe_arg(ids_obj, "expert_ids", NPY_INT32, 2, id, 0)) ||
        moe_check_min(n_experts, 1, "n_experts") < 0 ||
        moe_check_int32(id[1], "expert_ids has too many slots") < 0) {
        return NULL;
    }
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.n_tokens = id[0];
    p.top_k = (int32_t)id[1];
    p.n_experts = n_experts;
    p.token_index = NULL;
    p.offsets = moe_out(&o, 1, NPY_INT64, 1, (npy_intp)n_experts + 1, 0, 0);
    p.position = moe_out(&o, 3, NPY_INT64, 2, id[0], id[1], 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_dispatch_count(&p));
    if (st != MOE_STATUS_OK) {
        return moe_outs_done(&o, st, NULL);
    }
    g.n_rows = p.offsets[n_experts];
    p.token_index = moe_out(&o, 2, NPY_INT64, 1, (npy_intp)g.n_rows, 0, 0);
    g.out = moe_out(&o, 0, NPY_FLOAT32, 2, (npy_intp)g.n_rows, xd[1], 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    g.x = MOE_DATA(x, float);
    g.token_index = p.token_index;
    g.n_tokens = xd[0];
    g.d_model = xd[1];
    MOE_COMPUTE(st, moe_dispatch_build(&p));
    if (st == MOE_STATUS_OK) {
        MOE_COMPUTE(st, moe_dispatch_gather(&g));
    }
    return moe_outs_done(&o, st, NULL);
}

int
moe_combine_arrays(PyObject *y_obj, PyObject *pos_obj, PyObject *w_obj,
                   moe_combine_params *p)
{
    PyArrayObject *y, *pos, *w;
    npy_intp yd[2] = {-1, -1}, pd[2] = {-1, -1}, wd[2];

    if (!(y = moe_arg(y_obj, "y", NPY_FLOAT32, 2, yd, 0)) ||
        !(pos = moe_arg(pos_obj, "position", NPY_INT64, 2, pd, 0))) {
        return -1;
    }
    wd[0] = pd[0];
    wd[1] = pd[1];
    if (!(w = moe_arg(w_obj, "weights", NPY_FLOAT32, 2, wd, 0)) ||
        moe_check_int32(pd[1], "position has too many slots") < 0) {
        return -1;
    }
    memset(p, 0, sizeof(*p));
    p->y = MOE_DATA(y, float);
    p->position = MOE_DATA(pos, int64_t);
    p->weights = MOE_DATA(w, float);
    p->n_rows = yd[0];
    p->n_tokens = pd[0];
    p->top_k = (int32_t)pd[1];
    p->d_model = yd[1];
    return 0;
}

PyObject *
moe_py_combine(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"y", "position", "weights", NULL};
    PyObject *y_obj, *pos_obj, *w_obj;
    moe_outs o = MOE_OUTS(1);
    moe_combine_params p;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:combine", kwlist, &y_obj,
                                     &pos_obj, &w_obj) ||
        moe_combine_arrays(y_obj, pos_obj, w_obj, &p) < 0) {
        return NULL;
    }
    if (!(p.out = moe_out(&o, 0, NPY_FLOAT32, 2, p.n_tokens, p.d_model, 0))) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_combine(&p));
    return moe_outs_done(&o, st, NULL);
}

/* ---- packing ------------------------------------------------------------------ */

/*
 * The quantized weights of pack_experts: w_up (E, F, ku), w_down (E, d, kd)
 * (int8 values: k = d, F; uint8 nibble pairs: ceil(d / 2), ceil(F / 2)),
 * w_gate as w_up, and the scales of each, (E, rows, ceil(k / group_size))
 * uint16 float16 bits (mxfp4: uint8 e8m0).  Fills p's arrays and sizes.
 */
static int
moe_quantized_pack_args(moe_pack_params *p, PyObject *g_obj, PyObject *u_obj,
                        PyObject *dn_obj, PyObject *const s_obj[3])
{
    static const char *names[3] = {"w_gate", "w_up", "w_down"};
    static const char *snames[3] = {"w_gate_scales", "w_up_scales",
                                    "w_down_scales"};
    const int vtype = p->dtype == MOE_DTYPE_INT8 ? NPY_INT8 : NPY_UINT8;
    const int stype = p->dtype == MOE_DTYPE_MXFP4 ? NPY_UINT8 : NPY_UINT16;
    const int nibbles = p->dtype != MOE_DTYPE_INT8;
    PyObject *objs[3] = {g_obj, u_obj, dn_obj};
    npy_intp ud[3] = {-1, -1, -1}, dd[3] = {-1, -1, -1}, dims[3];
    PyArrayObject *up, *down;
    const void *data[3], *sc[3];
    int64_t F, d, g = p->group_size;
    int i;

    if (g < 0 || (p->dtype == MOE_DTYPE_MXFP4 && g != 32)) {
        PyErr_Format(PyExc_ValueError, "group_size must be %s, got %lld",
                     p->dtype == MOE_DTYPE_MXFP4 ? "32 for mxfp4"
                                                 : ">= 0 (0: one scale per row)",
                     (long long)g);
        return -1;
    }
    if (!(up = moe_arg(u_obj, "w_up", vtype, 3, ud, 0)) ||
        !(down = moe_arg(dn_obj, "w_down", vtype, 3, dd, 0))) {
        return -1;
    }
    if (ud[0] < 1 || ud[0] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "w_up must have 1..2^31-1 experts");
        return -1;
    }
    F = ud[1];
    d = dd[1];
    for (i = 0; i < 3; i++) {
        const int64_t k = i < 2 ? d : F;
        void *a, *s;
        dims[0] = ud[0];
        dims[1] = i < 2 ? F : d;
        dims[2] = nibbles ? (k + 1) / 2 : k;
        if (moe_opt_arg(objs[i], names[i], vtype, 3, dims, &a) < 0) {
            return -1;
        }
        dims[2] = g == 0 || g >= k ? k > 0 : (k - 1) / g + 1;
        if (moe_opt_arg(s_obj[i], snames[i], stype, 3, dims, &s) < 0) {
            return -1;
        }
        if ((a == NULL) != (s == NULL) || (i > 0 && a == NULL)) {
            PyErr_Format(PyExc_ValueError, "%s needs %s (and %s needs %s)",
                         names[i], snames[i], snames[i], names[i]);
            return -1;
        }
        data[i] = a;
        sc[i] = s;
    }
    p->w_gate = data[0];
    p->w_up = data[1];
    p->w_down = data[2];
    p->s_gate = sc[0];
    p->s_up = sc[1];
    p->s_down = sc[2];
    p->n_experts = (int32_t)ud[0];
    p->d_model = d;
    p->d_ff = F;
    return 0;
}

/* pack_experts(w_gate, w_up, w_down, dtype, *, b_gate, b_up, b_down,
 *              expert_d_ff, compute, w_gate_scales, w_up_scales,
 *              w_down_scales, group_size) -> packed experts */
PyObject *
moe_py_pack_experts(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"w_gate", "w_up", "w_down", "dtype", "b_gate",
                             "b_up", "b_down", "expert_d_ff", "compute",
                             "w_gate_scales", "w_up_scales", "w_down_scales",
                             "group_size", NULL};
    PyObject *g_obj, *u_obj, *dn_obj;
    PyObject *bg_obj = Py_None, *bu_obj = Py_None, *bd_obj = Py_None;
    PyObject *ff_obj = Py_None, *s_obj[3] = {Py_None, Py_None, Py_None};
    long long group_size = 0;
    npy_intp ud[3] = {-1, -1, -1}, dd[3], gd[3], bgd[2], bdd[2], ffd[1];
    int dtype, typenum, compute = 0;
    void *gate, *wu, *wd, *bg, *bu, *bdn, *ff;
    moe_pack_params p;
    moe_experts *w = NULL;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOi|$OOOOiOOOL:pack_experts",
                                     kwlist, &g_obj, &u_obj, &dn_obj, &dtype,
                                     &bg_obj, &bu_obj, &bd_obj, &ff_obj,
                                     &compute, &s_obj[0], &s_obj[1],
                                     &s_obj[2], &group_size) ||
        moe_check_enum(dtype, MOE_DTYPE_COUNT, "dtype") < 0 ||
        moe_check_enum(compute, MOE_COMPUTE_COUNT, "compute") < 0) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.dtype = (moe_dtype)dtype;
    p.group_size = group_size;
    if (moe_dtype_quantized(p.dtype)) {
        if (moe_quantized_pack_args(&p, g_obj, u_obj, dn_obj, s_obj) < 0) {
            return NULL;
        }
        ud[0] = p.n_experts;
        ud[1] = p.d_ff;
        ud[2] = p.d_model;
        gate = (void *)p.w_gate;
        bgd[0] = bdd[0] = ffd[0] = ud[0];
        bgd[1] = ud[1];
        bdd[1] = ud[2];
        if (moe_opt_arg(bg_obj, "b_gate", NPY_FLOAT32, 2, bgd, &bg) < 0 ||
            moe_opt_arg(bu_obj, "b_up", NPY_FLOAT32, 2, bgd, &bu) < 0 ||
            moe_opt_arg(bd_obj, "b_down", NPY_FLOAT32, 2, bdd, &bdn) < 0) {
            return NULL;
        }
        goto common;
    }
    if (s_obj[0] != Py_None || s_obj[1] != Py_None || s_obj[2] != Py_None) {
        PyErr_SetString(PyExc_ValueError, "scales are for quantized dtypes "
                        "only");
        return NULL;
    }
    typenum = dtype == MOE_DTYPE_F32 ? NPY_FLOAT32 : NPY_UINT16;
    if (u_obj == Py_None) {
        PyErr_SetString(PyExc_TypeError, "w_up must be a numpy.ndarray, got "
                        "NoneType");
        return NULL;
    }
    if (moe_weight_arg(u_obj, "w_up", typenum, ud, &wu, &p.up_strides) < 0) {
        return NULL;
    }
    if (ud[0] < 1 || ud[0] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "w_up must have 1..2^31-1 experts");
        return NULL;
    }
    memcpy(gd, ud, sizeof(gd));
    dd[0] = ud[0];
    dd[1] = ud[2];
    dd[2] = ud[1];
    bgd[0] = ud[0];
    bgd[1] = ud[1];
    bdd[0] = ud[0];
    bdd[1] = ud[2];
    ffd[0] = ud[0];
    if (dn_obj == Py_None) {
        PyErr_SetString(PyExc_TypeError, "w_down must be a numpy.ndarray, got "
                        "NoneType");
        return NULL;
    }
    if (moe_weight_arg(g_obj, "w_gate", typenum, gd, &gate, &p.gate_strides) < 0 ||
        moe_weight_arg(dn_obj, "w_down", typenum, dd, &wd, &p.down_strides) < 0 ||
        moe_opt_arg(bg_obj, "b_gate", NPY_FLOAT32, 2, bgd, &bg) < 0 ||
        moe_opt_arg(bu_obj, "b_up", NPY_FLOAT32, 2, bgd, &bu) < 0 ||
        moe_opt_arg(bd_obj, "b_down", NPY_FLOAT32, 2, bdd, &bdn) < 0) {
        return NULL;
    }
    p.w_gate = gate;
    p.w_up = wu;
    p.w_down = wd;
    p.n_experts = (int32_t)ud[0];
    p.d_model = ud[2];
    p.d_ff = ud[1];
common:
    if (bg != NULL && gate == NULL) {
        PyErr_SetString(PyExc_ValueError, "b_gate given without w_gate");
        return NULL;
    }
    if (moe_opt_arg(ff_obj, "expert_d_ff", NPY_INT64, 1, ffd, &ff) < 0) {
        return NULL;
    }
    p.expert_d_ff = ff;
    p.compute = (moe_compute)compute;
    p.b_gate = bg;
    p.b_up = bu;
    p.b_down = bdn;
    MOE_COMPUTE(st, moe_experts_pack(&p, &w));
    return moe_experts_capsule(st, w);
}

PyObject *
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
    return Py_BuildValue("{s:i,s:L,s:L,s:i,s:i,s:i,s:i,s:L,s:n}",
                         "n_experts", (int)info.n_experts, "d_model",
                         (long long)info.d_model, "d_ff",
                         (long long)info.d_ff, "gated", (int)info.gated,
                         "linear", (int)info.linear, "dtype", (int)info.dtype,
                         "compute", (int)info.compute,
                         "group_size", (long long)info.group_size,
                         "nbytes", (Py_ssize_t)info.nbytes);
}

/* pack_linear(w, dtype, *, bias) -> packed linear */
PyObject *
moe_py_pack_linear(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"w", "dtype", "bias", NULL};
    PyObject *w_obj, *b_obj = Py_None;
    PyArrayObject *w;
    npy_intp wd[3] = {-1, -1, -1}, bd[2];
    int dtype;
    void *bias;
    moe_linear_pack_params p;
    moe_experts *packed = NULL;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi|$O:pack_linear", kwlist,
                                     &w_obj, &dtype, &b_obj) ||
        moe_check_enum(dtype, MOE_DTYPE_COUNT, "dtype") < 0 ||
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
    return moe_experts_capsule(st, packed);
}

/* ---- grouped FFN and linear ----------------------------------------------- */

/*
 * The rows of a grouped op: x (n_tokens, d_in) float32; offsets
 * (n_groups + 1,) int64; token_index (n_rows,) int64 (row r is
 * x[token_index[r]]) or None (row r is x[r]).  Fills the params' fields of
 * the same names; 0 or -1 with an exception set.
 */
#define MOE_ROWS_ARG(p, x_obj, ti_obj, off_obj, d_in, n_groups)             \
    moe_rows_arg(x_obj, ti_obj, off_obj, d_in, n_groups, &(p).x,            \
                 &(p).token_index, &(p).n_tokens, &(p).offsets, &(p).n_rows)

static int
moe_rows_arg(PyObject *x_obj, PyObject *ti_obj, PyObject *off_obj,
             int64_t d_in, int32_t n_groups, const float **x,
             const int64_t **token_index, int64_t *n_tokens,
             const int64_t **offsets, int64_t *n_rows)
{
    PyArrayObject *xa, *off;
    npy_intp xd[2] = {-1, d_in}, od[1] = {(npy_intp)n_groups + 1}, td[1] = {-1};
    void *ti;

    if (!(xa = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0)) ||
        !(off = moe_arg(off_obj, "offsets", NPY_INT64, 1, od, 0)) ||
        moe_opt_arg(ti_obj, "token_index", NPY_INT64, 1, td, &ti) < 0) {
        return -1;
    }
    *x = MOE_DATA(xa, float);
    *token_index = ti;
    *n_tokens = xd[0];
    *offsets = MOE_DATA(off, int64_t);
    *n_rows = ti != NULL ? td[0] : xd[0];
    return 0;
}

/*
 * ffn_grouped's arguments (x, token_index, offsets, experts, activation, *,
 * alpha, limit, lora) into p; 0, or -1 with an exception set.
 * ffn_grouped_backward reads the same arguments.
 */
int
moe_ffn_parse(PyObject *args, PyObject *kw, moe_ffn_params *p)
{
    static char *kwlist[] = {"x", "token_index", "offsets", "experts",
                             "activation", "alpha", "limit", "lora", NULL};
    PyObject *x_obj, *ti_obj, *off_obj, *w_obj, *lora_obj = Py_None;
    moe_experts_info info;
    int activation;
    float alpha = 1.702f, limit = 7.0f;

    memset(p, 0, sizeof(*p));
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOi|$ffO:ffn_grouped",
                                     kwlist, &x_obj, &ti_obj, &off_obj,
                                     &w_obj, &activation, &alpha, &limit,
                                     &lora_obj) ||
        moe_lora_arg(lora_obj, &p->lora) < 0 ||
        moe_act_arg(activation, alpha, limit, &p->act) < 0 ||
        !(p->experts = moe_experts_arg(w_obj, "experts"))) {
        return -1;
    }
    moe_experts_get_info(p->experts, &info);
    return MOE_ROWS_ARG(*p, x_obj, ti_obj, off_obj, info.d_model,
                        info.n_experts);
}

/* ffn_grouped(x, token_index, offsets, experts, activation, *, alpha, limit,
 *             lora) -> (n_rows, d_model) */
PyObject *
moe_py_ffn_grouped(PyObject *self, PyObject *args, PyObject *kw)
{
    moe_outs o = MOE_OUTS(1);
    moe_experts_info info;
    moe_ffn_params p;
    moe_status st;

    if (moe_ffn_parse(args, kw, &p) < 0) {
        return NULL;
    }
    moe_experts_get_info(p.experts, &info);
    if (!(p.out = moe_out(&o, 0, NPY_FLOAT32, 2, p.n_rows, info.d_model, 0))) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_ffn_grouped(&p));
    return moe_outs_done(&o, st, NULL);
}

/* linear_grouped(x, token_index, offsets, weights) -> (n_rows, d_out) */
PyObject *
moe_py_linear_grouped(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "token_index", "offsets", "weights", NULL};
    PyObject *x_obj, *ti_obj, *off_obj, *w_obj;
    moe_experts_info info;
    moe_outs o = MOE_OUTS(1);
    moe_linear_params p;
    moe_status st;

    memset(&p, 0, sizeof(p));
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO:linear_grouped", kwlist,
                                     &x_obj, &ti_obj, &off_obj, &w_obj) ||
        !(p.weights = moe_packed_arg(w_obj, "weights", 1))) {
        return NULL;
    }
    moe_experts_get_info(p.weights, &info);
    if (MOE_ROWS_ARG(p, x_obj, ti_obj, off_obj, info.d_ff,
                     info.n_experts) < 0) {
        return NULL;
    }
    if (!(p.out = moe_out(&o, 0, NPY_FLOAT32, 2, p.n_rows, info.d_model, 0))) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_linear_grouped(&p));
    return moe_outs_done(&o, st, NULL);
}
