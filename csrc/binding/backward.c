/*
 * binding/backward.c - the staged ops' backward: route, combine, dispatch
 * and the grouped FFN.  A backward whose forward has options takes that
 * forward's own arguments (a tuple and a dict, parsed by the forward's
 * parse) so the two can never disagree; the layer's is in layers.c.
 */
#include "binding.h"

/*
 * route_backward(route_args, route_kwargs, expert_ids, d_weights, *,
 *                aux_coef, z_coef, router_grad) -> d_logits (T, E) float64
 */
PyObject *
moe_py_route_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"route_args", "route_kwargs", "expert_ids",
                             "d_weights", "aux_coef", "z_coef", "router_grad",
                             NULL};
    PyObject *ra, *rk, *ids_obj, *dw_obj;
    npy_intp kd[2];
    moe_route_params rp;
    moe_route_backward_params p;
    moe_outs o = MOE_OUTS(1);
    void *tmp;
    moe_status st;
    int grad = 0;

    memset(&p, 0, sizeof(p));
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!OO|$ddi:route_backward",
                                     kwlist, &PyTuple_Type, &ra, &PyDict_Type,
                                     &rk, &ids_obj, &dw_obj, &p.aux_coef,
                                     &p.z_coef, &grad) ||
        moe_check_enum(grad, MOE_ROUTER_GRAD_COUNT, "router_grad") < 0 ||
        moe_route_parse(ra, rk, &rp) < 0) {
        return NULL;
    }
    p.router_grad = (moe_router_grad)grad;
    kd[0] = rp.n_tokens;
    kd[1] = rp.opt.top_k;
    if (!(tmp = moe_arg(ids_obj, "expert_ids", NPY_INT32, 2, kd, 0))) {
        return NULL;
    }
    p.expert_ids = MOE_DATA(tmp, int32_t);
    if (!(tmp = moe_arg(dw_obj, "d_weights", NPY_FLOAT32, 2, kd, 0))) {
        return NULL;
    }
    p.d_weights = MOE_DATA(tmp, float);
    p.logits = rp.logits;
    p.n_tokens = rp.n_tokens;
    p.n_experts = rp.n_experts;
    p.opt = rp.opt;
    if (!(p.d_logits = moe_out(&o, 0, NPY_FLOAT64, 2, rp.n_tokens,
                               rp.n_experts, 0))) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_route_backward(&p));
    return moe_outs_done(&o, st, NULL);
}

/* router_backward(x, router_weight, d_logits) -> (dx, d_router_weight):
 * logits = x W^T (float64 d_logits). */
PyObject *
moe_py_router_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "router_weight", "d_logits", NULL};
    PyObject *x_obj, *w_obj, *g_obj;
    npy_intp xd[2] = {-1, -1}, wd[2] = {-1, -1}, gd[2];
    moe_router_backward_params p;
    moe_outs o = MOE_OUTS(2);
    void *x, *w, *g;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:router_backward", kwlist,
                                     &x_obj, &w_obj, &g_obj) ||
        !(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    wd[1] = xd[1];
    if (!(w = moe_arg(w_obj, "router_weight", NPY_FLOAT32, 2, wd, 0))) {
        return NULL;
    }
    gd[0] = xd[0];
    gd[1] = wd[0];
    if (!(g = moe_arg(g_obj, "d_logits", NPY_FLOAT64, 2, gd, 0))) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.x = MOE_DATA(x, float);
    p.weight = MOE_DATA(w, float);
    p.n_tokens = xd[0];
    p.d_model = xd[1];
    p.n_experts = (int32_t)wd[0];
    p.d_logits = MOE_DATA(g, double);
    p.dx = moe_out(&o, 0, NPY_FLOAT32, 2, xd[0], xd[1], 0);
    p.d_weight = moe_out(&o, 1, NPY_FLOAT32, 2, wd[0], xd[1], 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_router_backward(&p));
    return moe_outs_done(&o, st, NULL);
}

/* combine_backward(y, position, weights, d_out) -> (d_y, d_weights) */
PyObject *
moe_py_combine_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"y", "position", "weights", "d_out", NULL};
    PyObject *y_obj, *pos_obj, *w_obj, *d_obj;
    npy_intp dd[2];
    moe_combine_params c;
    moe_combine_backward_params p;
    moe_outs o = MOE_OUTS(2);
    void *d;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO:combine_backward", kwlist,
                                     &y_obj, &pos_obj, &w_obj, &d_obj) ||
        moe_combine_arrays(y_obj, pos_obj, w_obj, &c) < 0) {
        return NULL;
    }
    dd[0] = c.n_tokens;
    dd[1] = c.d_model;
    if (!(d = moe_arg(d_obj, "d_out", NPY_FLOAT32, 2, dd, 0))) {
        return NULL;
    }
    p = (moe_combine_backward_params){
        .y = c.y, .position = c.position, .weights = c.weights,
        .n_rows = c.n_rows, .n_tokens = c.n_tokens, .top_k = c.top_k,
        .d_model = c.d_model, .d_out = MOE_DATA(d, float)};
    p.d_y = moe_out(&o, 0, NPY_FLOAT32, 2, c.n_rows, c.d_model, 0);
    p.d_weights = moe_out(&o, 1, NPY_FLOAT32, 2, c.n_tokens, c.top_k, 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_combine_backward(&p));
    return moe_outs_done(&o, st, NULL);
}

/* dispatch_backward(d_rows, position) -> dx (n_tokens, d) */
PyObject *
moe_py_dispatch_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"d_rows", "position", NULL};
    PyObject *d_obj, *pos_obj;
    npy_intp dd[2] = {-1, -1}, pd[2] = {-1, -1};
    moe_dispatch_backward_params p;
    moe_outs o = MOE_OUTS(1);
    void *d, *pos;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:dispatch_backward", kwlist,
                                     &d_obj, &pos_obj) ||
        !(d = moe_arg(d_obj, "d_rows", NPY_FLOAT32, 2, dd, 0)) ||
        !(pos = moe_arg(pos_obj, "position", NPY_INT64, 2, pd, 0)) ||
        moe_check_int32(pd[1], "position has too many slots") < 0) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.d_rows = MOE_DATA(d, float);
    p.position = MOE_DATA(pos, int64_t);
    p.n_rows = dd[0];
    p.n_tokens = pd[0];
    p.top_k = (int32_t)pd[1];
    p.d_model = dd[1];
    if (!(p.dx = moe_out(&o, 0, NPY_FLOAT32, 2, pd[0], dd[1], 0))) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_dispatch_backward(&p));
    return moe_outs_done(&o, st, NULL);
}

/*
 * ffn_grouped_backward(ffn_args, ffn_kwargs, dy, *, w_gate, w_up, w_down,
 *                      biases) -> (dx, d_w_gate, d_w_up, d_w_down, d_b_gate,
 *                      d_b_up, d_b_down): dx the rows' gradient (n_rows, d);
 * the unpacked weights in the pack's dtype (uint16 bits for bf16 / fp16);
 * biases: also the bias gradients (else None).
 */
PyObject *
moe_py_ffn_grouped_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ffn_args", "ffn_kwargs", "dy", "w_gate", "w_up",
                             "w_down", "biases", NULL};
    PyObject *fa, *fk, *dy_obj;
    PyObject *wg_obj = Py_None, *wu_obj = Py_None, *wd_obj = Py_None;
    npy_intp dd[2];
    moe_experts_info info;
    moe_ffn_params fp;
    moe_ffn_backward_params p;
    moe_outs o = MOE_OUTS(7);
    int biases = 0;
    void *tmp;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw,
                                     "O!O!O|$OOOp:ffn_grouped_backward", kwlist,
                                     &PyTuple_Type, &fa, &PyDict_Type, &fk,
                                     &dy_obj, &wg_obj, &wu_obj, &wd_obj,
                                     &biases) ||
        moe_ffn_parse(fa, fk, &fp) < 0) {
        return NULL;
    }
    if (fp.lora != NULL) {
        PyErr_SetString(PyExc_NotImplementedError, "the FFN backward with expert "
                        "LoRA is not implemented yet");
        return NULL;
    }
    moe_experts_get_info(fp.experts, &info);
    memset(&p, 0, sizeof(p));
    dd[0] = fp.n_rows;
    dd[1] = info.d_model;
    if (!(tmp = moe_arg(dy_obj, "dy", NPY_FLOAT32, 2, dd, 0))) {
        return NULL;
    }
    p.dy = MOE_DATA(tmp, float);
    {
        const void *w[3];
        moe_wstrides ws[3];
        if (moe_unpacked_arg(fp.experts, 0, wg_obj, wu_obj, wd_obj, w, ws) < 0) {
            return NULL;
        }
        p.w_gate = w[0];
        p.w_up = w[1];
        p.w_down = w[2];
        p.gate_strides = ws[0];
        p.up_strides = ws[1];
        p.down_strides = ws[2];
    }
    p.x = fp.x;
    p.token_index = fp.token_index;
    p.n_tokens = fp.n_tokens;
    p.offsets = fp.offsets;
    p.n_rows = fp.n_rows;
    p.experts = fp.experts;
    p.act = fp.act;
    {
        const npy_intp fd[3] = {info.n_experts, info.d_ff, info.d_model};
        const npy_intp dn[3] = {info.n_experts, info.d_model, info.d_ff};
        p.dx = moe_out(&o, 0, NPY_FLOAT32, 2, fp.n_rows, info.d_model, 0);
        if (info.gated) {
            p.d_w_gate = moe_out_recycled(&o, 1, 3, fd[0], fd[1], fd[2]);
        }
        p.d_w_up = moe_out_recycled(&o, 2, 3, fd[0], fd[1], fd[2]);
        p.d_w_down = moe_out_recycled(&o, 3, 3, dn[0], dn[1], dn[2]);
        if (biases) {
            if (info.gated) {
                p.d_b_gate = moe_out(&o, 4, NPY_FLOAT32, 2, fd[0], fd[1], 0);
            }
            p.d_b_up = moe_out(&o, 5, NPY_FLOAT32, 2, fd[0], fd[1], 0);
            p.d_b_down = moe_out(&o, 6, NPY_FLOAT32, 2, fd[0], fd[2], 0);
        }
    }
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_ffn_backward(&p));
    return moe_outs_done(&o, st, NULL);
}

/* linear_backward(x, w, dy, dtype) -> (dx, d_w): y = x W^T, W (d_out, d_in) in
 * dtype (uint16 bits for bf16 / fp16). */
PyObject *
moe_py_linear_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "w", "dy", "dtype", NULL};
    PyObject *x_obj, *w_obj, *dy_obj;
    npy_intp xd[2] = {-1, -1}, wd[2] = {-1, -1}, dd[2];
    moe_linear_backward_params p;
    moe_outs o = MOE_OUTS(2);
    void *x, *w, *dy;
    int dtype;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOi:linear_backward", kwlist,
                                     &x_obj, &w_obj, &dy_obj, &dtype) ||
        moe_check_enum(dtype, MOE_DTYPE_COUNT, "dtype") < 0 ||
        !(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return NULL;
    }
    wd[1] = xd[1];
    if (!(w = moe_arg(w_obj, "w", dtype == MOE_DTYPE_F32 ? NPY_FLOAT32
                                                        : NPY_UINT16,
                      2, wd, 0))) {
        return NULL;
    }
    dd[0] = xd[0];
    dd[1] = wd[0];
    if (!(dy = moe_arg(dy_obj, "dy", NPY_FLOAT32, 2, dd, 0))) {
        return NULL;
    }
    p = (moe_linear_backward_params){
        .x = MOE_DATA(x, float), .w = PyArray_DATA((PyArrayObject *)w),
        .dtype = (moe_dtype)dtype, .n_tokens = xd[0], .d_in = xd[1],
        .d_out = wd[0], .dy = MOE_DATA(dy, float)};
    p.dx = moe_out(&o, 0, NPY_FLOAT32, 2, xd[0], xd[1], 0);
    p.d_w = moe_out_recycled(&o, 1, 2, wd[0], xd[1], 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_linear_backward(&p));
    return moe_outs_done(&o, st, NULL);
}
