/*
 * binding/layers.c - the wrappers of the whole layers: the sparse MoE layer,
 * PEER (product-key experts) and Soft MoE / Mixture of Tokens.
 */
#include "binding.h"

/* What moe_layer_parse found beyond the params: sizes and flags. */
typedef struct moe_layer_args {
    npy_intp n_tokens, d_model, n_router;
    int      width;      /* slots per token the outputs are made for     */
    int      want_norm;
    int      n_experts;
} moe_layer_args;

/*
 * The arguments of layer_forward(x, router_weight, experts, top_k,
 * activation, *, options) into p (pointing into the argument arrays, which
 * the caller's args keep alive) and a; 0, or -1 with an exception set.
 * Outputs are left for the caller.
 */
static int
moe_layer_parse(PyObject *args, PyObject *kw, moe_layer_params *p,
                moe_layer_args *a)
{
    static char *kwlist[] = {
        "x", "router_weight", "experts", "top_k", "activation", "expert_bias",
        "scoring", "renormalize", "routed_scaling", "n_groups", "topk_groups",
        "capacity_factor", "shared_experts", "shared_gate_weight",
        "router_bias", "alpha", "limit", "lora", "null_kinds", "null_values",
        "allowed", "groups", "want_out_norm", "router", "router_p", "k_min",
        "skip_threshold", "skip_renormalize", NULL};
    PyObject *x_obj, *r_obj, *w_obj, *bias_obj = Py_None, *sw_obj = Py_None;
    PyObject *sgate_obj = Py_None, *rbias_obj = Py_None;
    PyObject *lora_obj = Py_None, *nk_obj = Py_None, *nv_obj = Py_None;
    PyObject *al_obj = Py_None, *gr_obj = Py_None;
    PyArrayObject *x, *r;
    npy_intp xd[2] = {-1, -1}, rd[2], bd[1], gd[1];
    npy_intp nkd[1] = {-1}, nvd[2], ald[2], grd[1];
    int top_k, activation, scoring = MOE_SCORING_SOFTMAX, renormalize = 1;
    int n_groups = 1, topk_groups = 1, router = MOE_ROUTER_TOP_K, k_min = 1;
    int skip_renorm = 0, want_norm = 0;
    double routed_scaling = 1.0, capacity_factor = 0.0, router_p = 0.0;
    double skip_threshold = 0.0;
    float alpha = 1.702f, limit = 7.0f;
    void *tmp;
    moe_experts_info info;

    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "OOOii|$OipdiidOOOffOOOOOpididp:layer_forward", kwlist,
            &x_obj, &r_obj, &w_obj, &top_k, &activation, &bias_obj, &scoring,
            &renormalize, &routed_scaling, &n_groups, &topk_groups,
            &capacity_factor, &sw_obj, &sgate_obj, &rbias_obj, &alpha, &limit,
            &lora_obj, &nk_obj, &nv_obj, &al_obj, &gr_obj, &want_norm, &router,
            &router_p, &k_min, &skip_threshold, &skip_renorm)) {
        return -1;
    }
    memset(p, 0, sizeof(*p));
    if (moe_lora_arg(lora_obj, &p->lora) < 0) {
        return -1;
    }
    if (moe_check_enum(activation, MOE_ACTIVATION_COUNT, "activation") < 0 ||
        moe_check_enum(scoring, MOE_SCORING_COUNT, "scoring") < 0 ||
        moe_check_enum(router, MOE_ROUTER_COUNT, "router") < 0 ||
        !(p->experts = moe_experts_arg(w_obj, "experts"))) {
        return -1;
    }
    if (sw_obj != Py_None &&
        !(p->shared = moe_experts_arg(sw_obj, "shared_experts"))) {
        return -1;
    }
    moe_experts_get_info(p->experts, &info);
    xd[1] = info.d_model;
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return -1;
    }
    if (moe_opt_arg(nk_obj, "null_kinds", NPY_INT32, 1, nkd, &tmp) < 0) {
        return -1;
    }
    p->null_kinds = tmp;
    p->n_null = tmp != NULL ? (int32_t)nkd[0] : 0;
    if (p->n_null > INT32_MAX - info.n_experts) {
        PyErr_SetString(PyExc_ValueError, "too many null experts");
        return -1;
    }
    nvd[0] = p->n_null;
    nvd[1] = xd[1];
    if (moe_opt_arg(nv_obj, "null_values", NPY_FLOAT32, 2, nvd, &tmp) < 0) {
        return -1;
    }
    p->null_values = tmp;
    rd[0] = (npy_intp)info.n_experts + p->n_null;
    rd[1] = xd[1];
    if (!(r = moe_arg(r_obj, "router_weight", NPY_FLOAT32, 2, rd, 0))) {
        return -1;
    }
    bd[0] = rd[0];
    gd[0] = xd[1];
    if (moe_opt_arg(bias_obj, "expert_bias", NPY_FLOAT32, 1, bd, &tmp) < 0) {
        return -1;
    }
    p->route.expert_bias = tmp;
    if (moe_opt_arg(sgate_obj, "shared_gate_weight", NPY_FLOAT32, 1, gd,
                    &tmp) < 0) {
        return -1;
    }
    p->shared_gate = tmp;
    if (moe_opt_arg(rbias_obj, "router_bias", NPY_FLOAT32, 1, bd, &tmp) < 0) {
        return -1;
    }
    p->router_bias = tmp;
    grd[0] = xd[0];
    if (moe_opt_arg(gr_obj, "groups", NPY_INT32, 1, grd, &tmp) < 0) {
        return -1;
    }
    p->route.mask_rows = tmp;
    ald[0] = p->route.mask_rows != NULL ? -1 : xd[0];
    ald[1] = rd[0];
    if (moe_opt_arg(al_obj, "allowed", NPY_BOOL, 2, ald, &tmp) < 0) {
        return -1;
    }
    p->route.allowed = tmp;
    p->route.n_mask_rows = p->route.mask_rows != NULL ? ald[0] : 0;
    if (p->route.mask_rows != NULL && p->route.allowed == NULL) {
        PyErr_SetString(PyExc_ValueError, "groups needs an allowed (G, E) table");
        return -1;
    }
    if (top_k < 1 || top_k > rd[0]) {
        PyErr_Format(PyExc_ValueError, "top_k must be in 1..n_experts=%lld, "
                     "got %d", (long long)rd[0], top_k);
        return -1;
    }
    p->x = MOE_DATA(x, float);
    p->n_tokens = xd[0];
    p->d_model = xd[1];
    p->n_experts = info.n_experts;
    p->act.activation = (moe_activation)activation;
    p->act.alpha = alpha;
    p->act.limit = limit;
    p->router_weight = MOE_DATA(r, float);
    p->route = (moe_route_options){
        .top_k = top_k, .scoring = (moe_scoring)scoring,
        .renormalize = renormalize, .routed_scaling = routed_scaling,
        .n_groups = n_groups, .topk_groups = topk_groups,
        .capacity_factor = capacity_factor, .expert_bias = p->route.expert_bias,
        .allowed = p->route.allowed, .mask_rows = p->route.mask_rows,
        .n_mask_rows = p->route.n_mask_rows, .router = (moe_router)router,
        .router_p = router_p, .k_min = k_min};
    p->skip_threshold = skip_threshold;
    p->skip_renormalize = skip_renorm;
    a->n_tokens = xd[0];
    a->d_model = xd[1];
    a->n_router = rd[0];
    a->n_experts = info.n_experts;
    a->want_norm = want_norm;
    /* expert choice: up to every expert per token; the core says how many
     * it used (width) and writes (T, width) at the buffers' start */
    a->width = router == MOE_ROUTER_EXPERT_CHOICE ? (int)rd[0] : top_k;
    return 0;
}

/*
 * layer_forward(x, router_weight, experts, top_k, activation, *, options,
 *               save=False)
 * -> (out, ids, weights, counts, n_dropped, aux, z, n_real, out_norm, saved).
 * The options are keyword-only; absent ones are the plain top-k layer's.
 * save: saved = (logits, y, shared or None, gu or None), what
 * layer_backward reads (else None); save_hidden (with save): gu, the routed
 * rows' gate / up pre-activations (moe_ffn_params.save_gu, room for
 * n_tokens * width rows), so the backward recomputes nothing.
 */
PyObject *
moe_py_layer_forward(PyObject *self, PyObject *args, PyObject *kw)
{
    PyArrayObject *out = NULL, *ids = NULL, *weights = NULL, *counts = NULL;
    PyArrayObject *n_real = NULL, *out_norm = NULL;
    PyArrayObject *s_logits = NULL, *s_y = NULL, *s_shared = NULL, *s_gu = NULL;
    PyObject *saved = NULL, *kw2 = NULL, *save_obj = NULL;
    double aux = 0.0, z = 0.0;
    int64_t n_dropped = 0, n_skipped = 0;
    long long n_dropped_ll;
    int width = 0, save = 0, save_hidden = 0, s;
    static const char *own[2] = {"save", "save_hidden"};
    int *flag[2] = {&save, &save_hidden};
    moe_layer_args a;
    moe_layer_params p;
    moe_status st;

    /* save and save_hidden are this wrapper's own keywords: take them out
     * before the parse */
    for (s = 0; s < 2 && kw != NULL; s++) {
        if ((save_obj = PyDict_GetItemString(kw, own[s])) == NULL) {
            continue;
        }
        if ((*flag[s] = PyObject_IsTrue(save_obj)) < 0 ||
            (kw2 == NULL && !(kw2 = PyDict_Copy(kw))) ||
            PyDict_DelItemString(kw2, own[s]) < 0) {
            Py_XDECREF(kw2);
            return NULL;
        }
        kw = kw2;
    }
    if (moe_layer_parse(args, kw, &p, &a) < 0) {
        Py_XDECREF(kw2);
        return NULL;
    }
    width = a.width;
    ids = moe_new(2, a.n_tokens, width, NPY_INT32);
    weights = moe_new(2, a.n_tokens, width, NPY_FLOAT32);
    out = moe_new(2, a.n_tokens, a.d_model, NPY_FLOAT32);
    counts = moe_new(1, a.n_router, 0, NPY_INT64);
    if (!out || !ids || !weights || !counts) {
        goto fail;
    }
    if (p.n_null > 0) {
        if (!(n_real = moe_new(1, a.n_tokens, 0, NPY_INT32))) {
            goto fail;
        }
        p.n_real = MOE_DATA(n_real, int32_t);
    }
    if (a.want_norm) {
        if (!(out_norm = moe_new(1, a.n_experts, 0, NPY_FLOAT64))) {
            goto fail;
        }
        p.out_norm = MOE_DATA(out_norm, double);
    }
    if (save) {
        s_logits = moe_new(2, a.n_tokens, a.n_router, NPY_FLOAT64);
        s_y = moe_new(2, a.n_tokens * (npy_intp)width, a.d_model, NPY_FLOAT32);
        if (!s_logits || !s_y) {
            goto fail;
        }
        p.save_logits = MOE_DATA(s_logits, double);
        p.save_y = MOE_DATA(s_y, float);
        if (p.shared != NULL) {
            if (!(s_shared = moe_new(2, a.n_tokens, a.d_model, NPY_FLOAT32))) {
                goto fail;
            }
            p.save_shared = MOE_DATA(s_shared, float);
        }
        if (save_hidden) {
            moe_experts_info info;
            moe_experts_get_info(p.experts, &info);
            if (!(s_gu = moe_new(2, a.n_tokens * (npy_intp)width,
                                 (info.gated ? 2 : 1) * info.d_ff, NPY_FLOAT32))) {
                goto fail;
            }
            p.save_gu = MOE_DATA(s_gu, float);
        }
    }
    p.width = &width;
    p.out = MOE_DATA(out, float);
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.weights = MOE_DATA(weights, float);
    p.counts = MOE_DATA(counts, int64_t);
    p.n_dropped = &n_dropped;
    p.aux_loss = &aux;
    p.z_loss = &z;
    p.n_skipped = &n_skipped;
    MOE_COMPUTE(st, moe_layer_forward(&p));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto fail;
    }
    if (width < PyArray_DIM(ids, 1)) {
        /* (T, width) written densely at the buffers' start: copy that out */
        PyArrayObject *i2 = moe_new(2, a.n_tokens, width, NPY_INT32);
        PyArrayObject *w2 = moe_new(2, a.n_tokens, width, NPY_FLOAT32);
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
    if (save) {
        if (s_shared == NULL) {
            Py_INCREF(Py_None);
            s_shared = (PyArrayObject *)Py_None;
        }
        if (s_gu == NULL) {
            Py_INCREF(Py_None);
            s_gu = (PyArrayObject *)Py_None;
        }
        saved = Py_BuildValue("NNNN", s_logits, s_y, s_shared, s_gu);
        s_logits = s_y = s_shared = s_gu = NULL;
        if (saved == NULL) {
            goto fail;
        }
    }
    else {
        Py_INCREF(Py_None);
        saved = Py_None;
    }
    Py_XDECREF(kw2);
    return Py_BuildValue("NNNNLddNNN", out, ids, weights, counts, n_dropped_ll,
                         aux, z, n_real, out_norm, saved);
fail:
    Py_XDECREF(kw2);
    Py_XDECREF(n_real);
    Py_XDECREF(out_norm);
    Py_XDECREF(out);
    Py_XDECREF(ids);
    Py_XDECREF(weights);
    Py_XDECREF(counts);
    Py_XDECREF(s_logits);
    Py_XDECREF(s_y);
    Py_XDECREF(s_shared);
    Py_XDECREF(s_gu);
    return NULL;
}

/*
 * Whether w_gate and w_up (strides sg, su, element size es) are the two
 * halves of one fused (E, 2F, d) array -- transformers' gate_up_proj: their
 * gradients then go to one (E, 2F, d) array too (moe_gu_grads).
 */
static int
moe_fused_halves(const void *gate, const void *up, moe_wstrides sg,
                 moe_wstrides su, npy_intp F, npy_intp d, size_t es)
{
    const npy_intp half = F * d;

    return gate != NULL && half > 0 &&
           (const char *)up == (const char *)gate + (size_t)half * es &&
           sg.expert == 2 * half && sg.row == d && sg.col == 1 &&
           su.expert == 2 * half && su.row == d && su.col == 1;
}

/* One (E, 2F, d) gradient and views of its halves [:, :F] and [:, F:] into
 * g[0], g[1]: 0, or -1 with an exception set. */
static int
moe_gu_grads(npy_intp E, npy_intp F, npy_intp d, PyArrayObject **g)
{
    const npy_intp dims[3] = {E, 2 * F, d};
    PyArrayObject *fused = moe_new_recycled(3, dims);
    PyObject *all = PySlice_New(NULL, NULL, NULL);
    int i, rc = fused != NULL && all != NULL ? 0 : -1;

    for (i = 0; i < 2 && rc == 0; i++) {
        PyObject *lo = PyLong_FromSsize_t(i * F);
        PyObject *hi = PyLong_FromSsize_t((i + 1) * F);
        PyObject *rows = lo && hi ? PySlice_New(lo, hi, NULL) : NULL;
        PyObject *idx = rows ? PyTuple_Pack(3, all, rows, all) : NULL;
        PyObject *view = idx ? PyObject_GetItem((PyObject *)fused, idx) : NULL;
        Py_XDECREF(lo);
        Py_XDECREF(hi);
        Py_XDECREF(rows);
        Py_XDECREF(idx);
        if (view == NULL) {
            rc = -1;
        }
        g[i] = (PyArrayObject *)view;
    }
    Py_XDECREF(all);
    Py_XDECREF(fused);
    return rc;
}

/* dst[name] = arr (a new array) or None; -1 with an exception set. */
static int
moe_grad_item(PyObject *dict, const char *name, PyArrayObject *arr)
{
    int rc = PyDict_SetItemString(dict, name, arr ? (PyObject *)arr : Py_None);
    Py_XDECREF(arr);
    return rc;
}

/*
 * layer_backward(forward_args, forward_kwargs, expert_ids, weights, logits,
 *                y, shared, dy, *, w_gate, w_up, w_down, shared_w_gate,
 *                shared_w_up, shared_w_down, aux_coef, z_coef, biases,
 *                hidden)
 * -> dict of float32 gradients: "x", "router_weight", "router_bias", "w_gate",
 * "w_up", "w_down", "b_gate", "b_up", "b_down", "shared_w_gate",
 * "shared_w_up", "shared_w_down", "shared_gate_weight", "null_values" (None
 * for what the layer has not).  forward_args / forward_kwargs: exactly what
 * layer_forward got; expert_ids, weights and the saved (logits, y, shared,
 * hidden: its gu, or None to recompute it) are its results.  The unpacked FFN weights come in the pack's dtype
 * (uint16 bits for bf16 / fp16); biases: the layer has expert biases.
 */
PyObject *
moe_py_layer_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {
        "forward_args", "forward_kwargs", "expert_ids", "weights", "logits",
        "y", "shared", "dy", "w_gate", "w_up", "w_down", "shared_w_gate",
        "shared_w_up", "shared_w_down", "aux_coef", "z_coef", "biases",
        "lora_weights", "lora_rank", "lora_scaling", "frozen", "router_grad",
        "hidden", NULL};
    PyObject *fa, *fk, *ids_obj, *w_obj, *l_obj, *y_obj, *sh_obj, *dy_obj;
    PyObject *gu_obj = Py_None;
    PyObject *wg_obj = Py_None, *wu_obj = Py_None, *wd_obj = Py_None;
    PyObject *swg_obj = Py_None, *swu_obj = Py_None, *swd_obj = Py_None;
    PyObject *lw_obj = Py_None;
    PyObject *res = NULL;
    PyArrayObject *g[20] = {NULL};
    static const char *names[20] = {
        "x", "router_weight", "router_bias", "w_gate", "w_up", "w_down",
        "b_gate", "b_up", "b_down", "shared_w_gate", "shared_w_up",
        "shared_w_down", "shared_gate_weight", "null_values", "lora_a_gate",
        "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down", "lora_b_down"};
    double aux_coef = 0.0, z_coef = 0.0;
    float lora_scaling = 1.0f;
    int biases = 0, frozen = 0, lora_rank = 0, router_grad = 0, i;
    moe_expert_lora_params lp;
    moe_experts_info info, sinfo;
    moe_layer_args a;
    moe_layer_params p;
    moe_layer_backward_params b;
    void *tmp;
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "O!O!OOOOOO|$OOOOOOddpOifpiO:layer_backward", kwlist,
            &PyTuple_Type, &fa, &PyDict_Type, &fk, &ids_obj, &w_obj, &l_obj,
            &y_obj, &sh_obj, &dy_obj, &wg_obj, &wu_obj, &wd_obj, &swg_obj,
            &swu_obj, &swd_obj, &aux_coef, &z_coef, &biases, &lw_obj,
            &lora_rank, &lora_scaling, &frozen, &router_grad, &gu_obj) ||
        moe_check_enum(router_grad, MOE_ROUTER_GRAD_COUNT, "router_grad") < 0 ||
        moe_layer_parse(fa, fk, &p, &a) < 0) {
        return NULL;
    }
    moe_experts_get_info(p.experts, &info);
    memset(&b, 0, sizeof(b));
    memset(&lp, 0, sizeof(lp));
    if ((p.lora != NULL) != (lw_obj != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "lora_weights: the forward's expert "
                        "LoRA adapters unpacked, exactly when it had them");
        return NULL;
    }
    if (lw_obj != Py_None) {
        /* (a_gate, b_gate, a_up, b_up, a_down, b_down), each None or float32 */
        const float **dst[6] = {&lp.a_gate, &lp.b_gate, &lp.a_up, &lp.b_up,
                                &lp.a_down, &lp.b_down};
        static const char *lnames[6] = {"lora_a_gate", "lora_b_gate",
                                        "lora_a_up", "lora_b_up",
                                        "lora_a_down", "lora_b_down"};
        npy_intp ld[6][3];
        void *ptr;
        if (!PyTuple_Check(lw_obj) || PyTuple_GET_SIZE(lw_obj) != 6) {
            PyErr_SetString(PyExc_TypeError, "lora_weights must be a tuple of "
                            "6 arrays or None");
            return NULL;
        }
        if (moe_check_min(lora_rank, 1, "lora_rank") < 0) {
            return NULL;
        }
        lp.rank = lora_rank;  /* (the shapes below check it) */
        lp.scaling = lora_scaling;
        for (i = 0; i < 6; i++) {
            const npy_intp in = i < 4 ? info.d_model : info.d_ff;
            const npy_intp out = i < 4 ? info.d_ff : info.d_model;
            ld[i][0] = info.n_experts;
            ld[i][1] = i % 2 == 0 ? lp.rank : out;
            ld[i][2] = i % 2 == 0 ? in : lp.rank;
            if (moe_opt_arg(PyTuple_GET_ITEM(lw_obj, i), lnames[i], NPY_FLOAT32,
                            3, ld[i], &ptr) < 0) {
                return NULL;
            }
            *dst[i] = ptr;
        }
        b.lora = &lp;
    }
    {
        /* the forward's results (ids (T, width): top_k, or expert choice's
         * width) and what it saved, then dy; y holds at least T * width rows */
        npy_intp idd[2] = {a.n_tokens, -1};
        if (!(tmp = moe_arg(ids_obj, "expert_ids", NPY_INT32, 2, idd, 0))) {
            return NULL;
        }
        if (moe_check_int32(idd[1], "expert_ids has too many slots") < 0) {
            return NULL;
        }
        b.width = (int32_t)idd[1];
        p.expert_ids = MOE_DATA(tmp, int32_t);
    }
    {
        const npy_intp T = a.n_tokens, k = b.width, d = a.d_model;
        const struct {
            PyObject *obj; const char *name; int type; npy_intp d0, d1;
            const void **dst;
        } in[] = {
            {w_obj, "weights", NPY_FLOAT32, T, k, (const void **)&p.weights},
            {l_obj, "logits", NPY_FLOAT64, T, a.n_router,
             (const void **)&p.save_logits},
            {y_obj, "y", NPY_FLOAT32, -1, d, (const void **)&p.save_y},
            {sh_obj, "shared", NPY_FLOAT32, T, d, (const void **)&p.save_shared},
            {dy_obj, "dy", NPY_FLOAT32, T, d, (const void **)&b.dy}};
        size_t i_in;
        for (i_in = 0; i_in < sizeof(in) / sizeof(in[0]); i_in++) {
            npy_intp dims[2] = {in[i_in].d0, in[i_in].d1};
            if (in[i_in].obj == sh_obj && p.shared == NULL) {
                continue; /* no shared experts: nothing saved for them */
            }
            if (!(tmp = moe_arg(in[i_in].obj, in[i_in].name, in[i_in].type, 2,
                                dims, 0))) {
                return NULL;
            }
            *in[i_in].dst = PyArray_DATA((PyArrayObject *)tmp);
            if (in[i_in].obj == y_obj && dims[0] < T * k) {
                PyErr_Format(PyExc_ValueError, "y must have at least n_tokens * "
                             "width = %lld rows, got %lld", (long long)(T * k),
                             (long long)dims[0]);
                return NULL;
            }
        }
    }
    if (gu_obj != Py_None) {
        /* the forward's save_gu: room for n_tokens * width rows */
        npy_intp gd[2] = {-1, (info.gated ? 2 : 1) * info.d_ff};
        if (!(tmp = moe_arg(gu_obj, "hidden", NPY_FLOAT32, 2, gd, 0))) {
            return NULL;
        }
        if (gd[0] < a.n_tokens * (npy_intp)b.width) {
            PyErr_Format(PyExc_ValueError, "hidden must have at least n_tokens * "
                         "width = %lld rows, got %lld",
                         (long long)(a.n_tokens * (npy_intp)b.width),
                         (long long)gd[0]);
            return NULL;
        }
        p.save_gu = MOE_DATA(tmp, float);
    }
    b.forward = &p;

    b.aux_coef = aux_coef;
    b.z_coef = z_coef;
    b.router_grad = (moe_router_grad)router_grad;
    {
        const void *w[3], *sw[3] = {NULL, NULL, NULL};
        moe_wstrides ws[3];
        if (moe_unpacked_arg(p.experts, 0, wg_obj, wu_obj, wd_obj, w, ws) < 0 ||
            (p.shared != NULL &&
             moe_unpacked_arg(p.shared, 1, swg_obj, swu_obj, swd_obj, sw,
                              NULL) < 0)) {
            return NULL;
        }
        b.w_gate = w[0];
        b.w_up = w[1];
        b.w_down = w[2];
        b.gate_strides = ws[0];
        b.up_strides = ws[1];
        b.down_strides = ws[2];
        b.shared_w_gate = sw[0];
        b.shared_w_up = sw[1];
        b.shared_w_down = sw[2];
    }
    if (p.shared != NULL) {
        moe_experts_get_info(p.shared, &sinfo);
    }
    {
        /* each gradient's shape (ndim 0: the layer has no such weight) */
        const int sh = p.shared != NULL, sg = sh && sinfo.gated;
        const npy_intp E = info.n_experts, F = info.d_ff, d = info.d_model;
        const npy_intp SF = sh ? sinfo.d_ff : 0;
        /* frozen: the experts' weights and biases (LoRA fine-tuning) get
         * no gradient, none is computed */
        const int tr = !frozen, R = lp.rank;
        const struct { int ndim; npy_intp dims[3]; } shape[20] = {
            {2, {a.n_tokens, d}}, {2, {a.n_router, d}},
            {p.router_bias != NULL, {a.n_router}},
            {tr && info.gated ? 3 : 0, {E, F, d}}, {tr ? 3 : 0, {E, F, d}},
            {tr ? 3 : 0, {E, d, F}},
            {tr && biases && info.gated ? 2 : 0, {E, F}},
            {tr && biases ? 2 : 0, {E, F}}, {tr && biases ? 2 : 0, {E, d}},
            {tr && sg ? 2 : 0, {SF, d}}, {tr && sh ? 2 : 0, {SF, d}},
            {tr && sh ? 2 : 0, {d, SF}},
            {sh && p.shared_gate != NULL ? 2 : 0, {1, d}},
            {p.null_values != NULL ? 2 : 0, {p.n_null, d}},
            {lp.a_gate ? 3 : 0, {E, R, d}}, {lp.b_gate ? 3 : 0, {E, F, R}},
            {lp.a_up ? 3 : 0, {E, R, d}}, {lp.b_up ? 3 : 0, {E, F, R}},
            {lp.a_down ? 3 : 0, {E, R, F}}, {lp.b_down ? 3 : 0, {E, d, R}}};
        /* gate and up as the halves of one fused array (gate_up_proj): so
         * are their gradients, one (E, 2F, d) array */
        const int fused = shape[3].ndim == 3 &&
            moe_fused_halves(b.w_gate, b.w_up, b.gate_strides, b.up_strides, F,
                             d, info.dtype == MOE_DTYPE_F32 ? 4 : 2);
        if (fused && moe_gu_grads(E, F, d, &g[3]) == 0) {
            b.d_gu_stride = 2 * F * d;
        }
        for (i = 0; i < 20 && !PyErr_Occurred(); i++) {
            if (shape[i].ndim > 0 && g[i] == NULL) {
                g[i] = moe_new_recycled(shape[i].ndim, shape[i].dims);
            }
        }
    }
    if (PyErr_Occurred()) {
        goto done;
    }
    {
        float **dst[20] = {&b.dx, &b.d_router_weight, &b.d_router_bias,
                           &b.d_w_gate, &b.d_w_up, &b.d_w_down, &b.d_b_gate,
                           &b.d_b_up, &b.d_b_down, &b.d_shared_w_gate,
                           &b.d_shared_w_up, &b.d_shared_w_down,
                           &b.d_shared_gate, &b.d_null_values,
                           &b.d_lora_a_gate, &b.d_lora_b_gate,
                           &b.d_lora_a_up, &b.d_lora_b_up,
                           &b.d_lora_a_down, &b.d_lora_b_down}; /* as names */
        for (i = 0; i < 20; i++) {
            *dst[i] = g[i] != NULL ? MOE_DATA(g[i], float) : NULL;
        }
    }
    MOE_COMPUTE(st, moe_layer_backward(&b));
    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        goto done;
    }
    if (!(res = PyDict_New())) {
        goto done;
    }
    for (i = 0; i < 20; i++) {
        PyArrayObject *arr = g[i];
        g[i] = NULL;
        if (moe_grad_item(res, names[i], arr) < 0) {
            Py_CLEAR(res);
            goto done;
        }
    }
done:
    for (i = 0; i < 20; i++) {
        Py_XDECREF(g[i]);
    }
    return res;
}

/*
 * peer_forward(x, w_query, sub_keys_1, sub_keys_2, u, v, top_k, activation,
 *              *, return_routing) -> (out, expert_ids or None, gates or None)
 * The sub-keys arrive as (n_key_sets, n, d_key / 2), one set shared by the
 * heads or one per head; the expert rows u (n^2, d), v (n^2, d_out).  With
 * return_routing, also the ids and gates (T, n_heads, top_k).
 */
static int
moe_peer_parse(PyObject *args, PyObject *kw, moe_peer_params *p, int *routing)
{
    static char *kwlist[] = {"x", "w_query", "sub_keys_1", "sub_keys_2", "u",
                             "v", "top_k", "activation", "return_routing",
                             NULL};
    PyObject *x_obj, *wq_obj, *k1_obj, *k2_obj, *u_obj, *v_obj;
    PyArrayObject *x, *wq, *k1, *k2, *u, *v;
    npy_intp xd[2] = {-1, -1}, qd[3] = {-1, -1, -1}, kd[3] = {-1, -1, -1};
    npy_intp ud[2], vd[2];
    int top_k, activation;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOii|$p:peer_forward",
                                     kwlist, &x_obj, &wq_obj, &k1_obj, &k2_obj,
                                     &u_obj, &v_obj, &top_k, &activation,
                                     routing) ||
        moe_check_enum(activation, MOE_PEER_ACTIVATION_COUNT,
                       "activation") < 0 ||
        !(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0))) {
        return -1;
    }
    qd[2] = xd[1];
    if (!(wq = moe_arg(wq_obj, "w_query", NPY_FLOAT32, 3, qd, 0))) {
        return -1;
    }
    if (qd[0] < 1 || qd[0] > INT32_MAX || qd[1] < 2 || qd[1] % 2 != 0 ||
        qd[1] > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "w_query must have shape (n_heads >= 1,"
                     " d_key even >= 2, d_model), got (%lld, %lld, %lld)",
                     (long long)qd[0], (long long)qd[1], (long long)qd[2]);
        return -1;
    }
    kd[2] = qd[1] / 2;
    if (!(k1 = moe_arg(k1_obj, "sub_keys_1", NPY_FLOAT32, 3, kd, 0))) {
        return -1;
    }
    if (kd[0] != 1 && kd[0] != qd[0]) {
        PyErr_Format(PyExc_ValueError, "sub_keys_1 must have 1 (shared) or "
                     "n_heads=%lld (per head) key sets, got %lld",
                     (long long)qd[0], (long long)kd[0]);
        return -1;
    }
    if (kd[1] < 1 || kd[1] > 46340) {
        PyErr_Format(PyExc_ValueError, "sub_keys_1 must have 1..46340 sub-keys"
                     " (n^2 experts), got %lld", (long long)kd[1]);
        return -1;
    }
    ud[0] = kd[1] * kd[1];
    ud[1] = xd[1];
    vd[0] = ud[0];
    vd[1] = -1;
    if (!(k2 = moe_arg(k2_obj, "sub_keys_2", NPY_FLOAT32, 3, kd, 0)) ||
        !(u = moe_arg(u_obj, "u", NPY_FLOAT32, 2, ud, 0)) ||
        !(v = moe_arg(v_obj, "v", NPY_FLOAT32, 2, vd, 0)) ||
        moe_check_range(top_k, 1, kd[1], "top_k", "n_sub_keys") < 0) {
        return -1;
    }
    if (vd[1] < 1 || xd[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "d_model and d_out must be >= 1");
        return -1;
    }
    memset(p, 0, sizeof(*p));
    p->x = MOE_DATA(x, float);
    p->n_tokens = xd[0];
    p->d_model = xd[1];
    p->d_out = vd[1];
    p->n_heads = (int32_t)qd[0];
    p->d_key = (int32_t)qd[1];
    p->n_sub_keys = (int32_t)kd[1];
    p->top_k = top_k;
    p->n_key_sets = (int32_t)kd[0];
    p->w_query = MOE_DATA(wq, float);
    p->sub_keys_1 = MOE_DATA(k1, float);
    p->sub_keys_2 = MOE_DATA(k2, float);
    p->u = MOE_DATA(u, float);
    p->v = MOE_DATA(v, float);
    p->activation = (moe_peer_activation)activation;
    return 0;
}

PyObject *
moe_py_peer_forward(PyObject *self, PyObject *args, PyObject *kw)
{
    moe_outs o = MOE_OUTS(3);
    moe_peer_params p;
    moe_status st;
    int routing = 0;

    if (moe_peer_parse(args, kw, &p, &routing) < 0) {
        return NULL;
    }
    p.out = moe_out(&o, 0, NPY_FLOAT32, 2, p.n_tokens, p.d_out, 0);
    if (routing) {
        p.expert_ids = moe_out(&o, 1, NPY_INT32, 3, p.n_tokens, p.n_heads,
                               p.top_k);
        p.gates = moe_out(&o, 2, NPY_FLOAT32, 3, p.n_tokens, p.n_heads,
                          p.top_k);
    }
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_peer_forward(&p));
    return moe_outs_done(&o, st, NULL);
}

/*
 * peer_backward(args, kw, expert_ids, dy) -> (dx, d_w_query, d_sub_keys_1,
 * d_sub_keys_2, used, d_u, d_v): args, kw the forward's; its expert_ids
 * (T, n_heads, top_k); used (U,) int64 the distinct experts, ascending, and
 * d_u (U, d_model), d_v (U, d_out) their rows' gradients.
 */
PyObject *
moe_py_peer_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"args", "kw", "expert_ids", "dy", NULL};
    PyObject *fargs, *fkw, *ids_obj, *dy_obj;
    npy_intp idd[3], dyd[2];
    void *ids, *dy;
    int routing = 0;
    int64_t n_used = 0;
    moe_peer_params fp;
    moe_peer_backward_params p;
    moe_outs o = MOE_OUTS(7);
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!OO:peer_backward", kwlist,
                                     &PyTuple_Type, &fargs, &PyDict_Type, &fkw,
                                     &ids_obj, &dy_obj) ||
        moe_peer_parse(fargs, fkw, &fp, &routing) < 0) {
        return NULL;
    }
    idd[0] = fp.n_tokens;
    idd[1] = fp.n_heads;
    idd[2] = fp.top_k;
    dyd[0] = fp.n_tokens;
    dyd[1] = fp.d_out;
    if (!(ids = moe_arg(ids_obj, "expert_ids", NPY_INT32, 3, idd, 0)) ||
        !(dy = moe_arg(dy_obj, "dy", NPY_FLOAT32, 2, dyd, 0))) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.forward = &fp;
    p.expert_ids = MOE_DATA(ids, int32_t);
    p.dy = MOE_DATA(dy, float);
    MOE_COMPUTE(st, moe_peer_used(p.expert_ids, fp.n_tokens * fp.n_heads *
                                  fp.top_k, NULL, &n_used));
    if (st != MOE_STATUS_OK) {
        return moe_raise(st);
    }
    p.n_used = n_used;
    p.dx = moe_out(&o, 0, NPY_FLOAT32, 2, fp.n_tokens, fp.d_model, 0);
    p.d_w_query = moe_out(&o, 1, NPY_FLOAT32, 3, fp.n_heads, fp.d_key,
                          fp.d_model);
    p.d_sub_keys_1 = moe_out(&o, 2, NPY_FLOAT32, 3, fp.n_key_sets,
                             fp.n_sub_keys, fp.d_key / 2);
    p.d_sub_keys_2 = moe_out(&o, 3, NPY_FLOAT32, 3, fp.n_key_sets,
                             fp.n_sub_keys, fp.d_key / 2);
    p.used = moe_out(&o, 4, NPY_INT64, 1, n_used, 0, 0);
    p.d_u = moe_out(&o, 5, NPY_FLOAT32, 2, n_used, fp.d_model, 0);
    p.d_v = moe_out(&o, 6, NPY_FLOAT32, 2, n_used, fp.d_out, 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_peer_used(p.expert_ids, fp.n_tokens * fp.n_heads *
                                  fp.top_k, (int64_t *)p.used, &n_used));
    if (st == MOE_STATUS_OK) {
        MOE_COMPUTE(st, moe_peer_backward(&p));
    }
    return moe_outs_done(&o, st, NULL);
}

/* What moe_soft_parse found beyond the params. */
typedef struct moe_soft_args {
    npy_intp xd[3];     /* x's shape (A, B, d)                            */
    npy_intp n_slots;   /* E * s                                          */
    npy_intp n_ys;      /* rows of the saved expert outputs               */
    int      want;      /* return_weights                                 */
    int      save;      /* save (for the backward)                        */
} moe_soft_args;

/*
 * The arguments of soft_moe_forward(x, phi, experts, slots_per_expert,
 * activation, normalize, scale, temperature, *, across, return_weights,
 * alpha, limit, save) into p (pointing into the argument arrays) and a;
 * 0, or -1 with an exception set.
 * x (A, B, d): across=0: A groups of B tokens each (Soft MoE); across=1: B
 * groups of A tokens, group b = x[:, b] (Mixture of Tokens).
 */
static int
moe_soft_parse(PyObject *args, PyObject *kw, moe_soft_moe_params *p,
               moe_soft_args *a)
{
    static char *kwlist[] = {"x", "phi", "experts", "slots_per_expert",
                             "activation", "normalize", "scale",
                             "temperature", "across", "return_weights",
                             "alpha", "limit", "save", NULL};
    PyObject *x_obj, *phi_obj, *w_obj;
    PyArrayObject *x, *phi;
    npy_intp pd[2];
    int slots, activation, normalize, across = 0;
    float alpha = 1.702f, limit = 7.0f;
    moe_experts_info info;

    memset(p, 0, sizeof(*p));
    memset(a, 0, sizeof(*a));
    a->xd[0] = a->xd[1] = a->xd[2] = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw,
                                     "OOOiipdd|$ppffp:soft_moe_forward", kwlist,
                                     &x_obj, &phi_obj, &w_obj, &slots,
                                     &activation, &normalize, &p->scale,
                                     &p->temperature, &across, &a->want,
                                     &alpha, &limit, &a->save) ||
        moe_act_arg(activation, alpha, limit, &p->act) < 0 ||
        !(p->experts = moe_experts_arg(w_obj, "experts"))) {
        return -1;
    }
    moe_experts_get_info(p->experts, &info);
    if (slots < 1 || (int64_t)info.n_experts * slots > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "slots_per_expert must be in 1..%lld "
                     "(n_experts * slots < 2^31), got %d",
                     (long long)(INT32_MAX / info.n_experts), slots);
        return -1;
    }
    a->xd[2] = info.d_model;
    pd[1] = a->n_slots = (npy_intp)info.n_experts * slots;
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 3, a->xd, 0))) {
        return -1;
    }
    pd[0] = a->xd[2];
    if (!(phi = moe_arg(phi_obj, "phi", NPY_FLOAT32, 2, pd, 0))) {
        return -1;
    }
    p->x = MOE_DATA(x, float);
    p->n_groups = across ? a->xd[1] : a->xd[0];
    p->group_size = across ? a->xd[0] : a->xd[1];
    p->d_model = a->xd[2];
    p->grouping = across ? MOE_SOFT_GROUPS_STRIDED : MOE_SOFT_GROUPS_ROWS;
    p->phi = MOE_DATA(phi, float);
    p->n_experts = info.n_experts;
    p->slots_per_expert = slots;
    p->normalize = normalize;
    a->n_ys = p->group_size > 1 ? p->n_groups * a->n_slots
                                : p->n_groups * p->group_size * info.n_experts;
    return 0;
}

/* soft_moe_forward(the arguments of moe_soft_parse) -> (out (A, B, d),
 * dispatch (A, B, E*s) or None, combine (A, B, E*s) or None, the saved
 * expert outputs (n_ys, d) with save, else None). */
PyObject *
moe_py_soft_moe_forward(PyObject *self, PyObject *args, PyObject *kw)
{
    moe_outs o = MOE_OUTS(4);
    moe_soft_moe_params p;
    moe_soft_args a;
    moe_status st;

    if (moe_soft_parse(args, kw, &p, &a) < 0) {
        return NULL;
    }
    p.out = moe_out(&o, 0, NPY_FLOAT32, 3, a.xd[0], a.xd[1], a.xd[2]);
    if (a.want) {
        p.dispatch = moe_out(&o, 1, NPY_FLOAT32, 3, a.xd[0], a.xd[1], a.n_slots);
        p.combine = moe_out(&o, 2, NPY_FLOAT32, 3, a.xd[0], a.xd[1], a.n_slots);
    }
    if (a.save) {
        p.save_ys = moe_out(&o, 3, NPY_FLOAT32, 2, a.n_ys, a.xd[2], 0);
    }
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_soft_moe_forward(&p));
    return moe_outs_done(&o, st, NULL);
}

/*
 * soft_moe_backward(args, kw, ys, dy, *, w_gate, w_up, w_down) -> (dx, d_phi,
 * d_w_gate or None, d_w_up, d_w_down, d_scale): args, kw the forward's, ys
 * its saved expert outputs, dy the output's gradient (x's shape), the
 * unpacked expert weights in the pack's dtype (uint16 bits for bf16 / fp16).
 */
PyObject *
moe_py_soft_moe_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"args", "kw", "ys", "dy", "w_gate", "w_up",
                             "w_down", NULL};
    PyObject *fargs, *fkw, *ys_obj, *dy_obj;
    PyObject *wobj[3] = {Py_None, Py_None, Py_None};
    npy_intp yd[2], wd[3][3];
    void *ys, *dy, *w[3];
    moe_experts_info info;
    moe_soft_moe_params fp;
    moe_soft_moe_backward_params p;
    moe_soft_args a;
    moe_outs o = MOE_OUTS(5);
    double d_scale = 0.0;
    moe_status st;
    int m, wtype;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!OO|$OOO:soft_moe_backward",
                                     kwlist, &PyTuple_Type, &fargs,
                                     &PyDict_Type, &fkw, &ys_obj, &dy_obj,
                                     &wobj[0], &wobj[1], &wobj[2]) ||
        moe_soft_parse(fargs, fkw, &fp, &a) < 0) {
        return NULL;
    }
    moe_experts_get_info(fp.experts, &info);
    yd[0] = a.n_ys;
    yd[1] = a.xd[2];
    if (!(ys = moe_arg(ys_obj, "ys", NPY_FLOAT32, 2, yd, 0)) ||
        !(dy = moe_arg(dy_obj, "dy", NPY_FLOAT32, 3, a.xd, 0))) {
        return NULL;
    }
    wtype = info.dtype == MOE_DTYPE_F32 ? NPY_FLOAT32 : NPY_UINT16;
    for (m = 0; m < 3; m++) {
        wd[m][0] = info.n_experts;
        wd[m][1] = m < 2 ? info.d_ff : info.d_model;
        wd[m][2] = m < 2 ? info.d_model : info.d_ff;
        if (moe_opt_arg(wobj[m], m == 0 ? "w_gate" : m == 1 ? "w_up" : "w_down",
                        wtype, 3, wd[m], &w[m]) < 0) {
            return NULL;
        }
    }
    if ((w[0] != NULL) != info.gated || w[1] == NULL || w[2] == NULL) {
        PyErr_SetString(PyExc_ValueError, "soft_moe_backward needs w_up, "
                        "w_down and (gated experts only) w_gate");
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.forward = &fp;
    p.ys = MOE_DATA(ys, float);
    p.w_gate = w[0];
    p.w_up = w[1];
    p.w_down = w[2];
    p.dy = MOE_DATA(dy, float);
    p.d_scale = &d_scale;
    p.dx = moe_out(&o, 0, NPY_FLOAT32, 3, a.xd[0], a.xd[1], a.xd[2]);
    p.d_phi = moe_out(&o, 1, NPY_FLOAT32, 2, a.xd[2], a.n_slots, 0);
    if (info.gated) {
        p.d_w_gate = moe_out_recycled(&o, 2, 3, wd[0][0], wd[0][1], wd[0][2]);
    }
    p.d_w_up = moe_out_recycled(&o, 3, 3, wd[1][0], wd[1][1], wd[1][2]);
    p.d_w_down = moe_out_recycled(&o, 4, 3, wd[2][0], wd[2][1], wd[2][2]);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_soft_moe_backward(&p));
    return moe_outs_done(&o, st, "(d)", d_scale);
}
