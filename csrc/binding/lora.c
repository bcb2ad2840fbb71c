/*
 * binding/lora.c - the LoRA wrappers: LoRA packed onto experts (a capsule
 * that keeps the experts' capsule alive) and the mixture-of-LoRA layers'
 * forward on packed linears (moe/lora.py).
 */
#include "binding.h"

static void
moe_lora_capsule_free(PyObject *capsule)
{
    moe_expert_lora_free(PyCapsule_GetPointer(capsule, MOE_LORA_CAPSULE));
    Py_XDECREF((PyObject *)PyCapsule_GetContext(capsule));
}

/*
 * pack_expert_lora(experts, rank, scaling, *, a_gate, b_gate, a_up, b_up,
 *                  a_down, b_down) -> capsule; each pair may be None.
 */
PyObject *
moe_py_pack_expert_lora(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"experts", "rank", "scaling", "a_gate", "b_gate",
                             "a_up", "b_up", "a_down", "b_down", NULL};
    PyObject *w_obj, *capsule;
    PyObject *obj[6] = {Py_None, Py_None, Py_None, Py_None, Py_None, Py_None};
    void *data[6];
    npy_intp dims[6][3];
    const moe_experts *w;
    moe_experts_info info;
    moe_expert_lora_params p;
    moe_expert_lora *lora = NULL;
    moe_status st;
    int rank, i;
    float scaling;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oif|$OOOOOO:pack_expert_lora",
                                     kwlist, &w_obj, &rank, &scaling, &obj[0],
                                     &obj[1], &obj[2], &obj[3], &obj[4],
                                     &obj[5]) ||
        !(w = moe_experts_arg(w_obj, "experts")) ||
        moe_check_min(rank, 1, "rank") < 0) {
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
        if (moe_opt_arg(obj[i], kwlist[3 + i], NPY_FLOAT32, 3, dims[i],
                        &data[i]) < 0) {
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

/*
 * The arguments of lora_forward(x, base, kind, lora_a, bank, n_adapters, ids,
 * weights, scaling, *, adapter_scaling, select_k, select_signed, rank_bias)
 * into p (pointing into the argument arrays, which the caller's args keep
 * alive); 0, or -1 with an exception set.  Outputs are left for the caller.
 */
static int
moe_lora_parse(PyObject *args, PyObject *kw, moe_lora_params *p, int *save_z)
{
    static char *kwlist[] = {"x", "base", "kind", "lora_a", "bank",
                             "n_adapters", "ids", "weights", "scaling",
                             "adapter_scaling", "select_k", "select_signed",
                             "rank_bias", "save_z", NULL};
    PyObject *x_obj, *base_obj, *a_obj, *bank_obj, *ids_obj, *w_obj;
    PyObject *as_obj = Py_None, *rb_obj = Py_None;
    PyArrayObject *x;
    npy_intp xd[2] = {-1, -1}, id[2] = {-1, -1}, wd[2], ad[1], rd[1];
    int kind, n_adapters, select_k = 0, select_signed = 0;
    void *ids, *weights, *ascale, *rbias;
    moe_experts_info ainfo, binfo;

    memset(p, 0, sizeof(*p));
    *save_z = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiOOiOOf|$OiiOp:lora_forward",
                                     kwlist, &x_obj, &base_obj, &kind, &a_obj,
                                     &bank_obj, &n_adapters, &ids_obj, &w_obj,
                                     &p->scaling, &as_obj, &select_k,
                                     &select_signed, &rb_obj, save_z) ||
        moe_check_enum(kind, 3, "kind") < 0 ||
        !(p->lora_a = moe_packed_arg(a_obj, "lora_a", 1)) ||
        (base_obj != Py_None &&
         !(p->base = moe_packed_arg(base_obj, "base", 1))) ||
        moe_check_min(n_adapters, 1, "n_adapters") < 0) {
        return -1;
    }
    moe_experts_get_info(p->lora_a, &ainfo);
    xd[1] = ainfo.d_ff;
    if (!(x = moe_arg(x_obj, "x", NPY_FLOAT32, 2, xd, 0)) ||
        !(p->bank = moe_packed_arg(bank_obj, "bank", 1))) {
        return -1;
    }
    moe_experts_get_info(p->bank, &binfo);
    if (moe_opt_arg(ids_obj, "ids", NPY_INT32, 2, id, &ids) < 0) {
        return -1;
    }
    if (ids != NULL && id[0] != xd[0]) {
        PyErr_Format(PyExc_ValueError, "ids must have n_tokens=%lld rows, "
                     "got %lld", (long long)xd[0], (long long)id[0]);
        return -1;
    }
    if (ids == NULL && select_k <= 0) {
        PyErr_SetString(PyExc_ValueError, "ids are required without "
                        "rank selection");
        return -1;
    }
    wd[0] = xd[0];
    wd[1] = ids != NULL ? id[1] : select_k;
    ad[0] = n_adapters;
    rd[0] = ainfo.d_model;
    if (moe_opt_arg(w_obj, "weights", NPY_FLOAT32, 2, wd, &weights) < 0 ||
        moe_opt_arg(as_obj, "adapter_scaling", NPY_FLOAT32, 1, ad,
                    &ascale) < 0 ||
        moe_opt_arg(rb_obj, "rank_bias", NPY_FLOAT32, 1, rd, &rbias) < 0) {
        return -1;
    }
    if (select_k > 0 && (select_k > ainfo.d_model || ids != NULL)) {
        PyErr_Format(PyExc_ValueError, "top_k must be in 1..rank=%lld with "
                     "no ids given, got %d", (long long)ainfo.d_model,
                     select_k);
        return -1;
    }
    p->x = MOE_DATA(x, float);
    p->n_tokens = xd[0];
    p->d_in = xd[1];
    p->d_out = binfo.d_model;
    p->rank = (int32_t)ainfo.d_model;
    p->kind = (moe_lora_kind)kind;
    p->n_adapters = n_adapters;
    p->n_slots = (int32_t)wd[1];
    p->ids = ids;
    p->weights = weights;
    p->adapter_scaling = ascale;
    p->select_k = select_k > 0 ? select_k : 0;
    p->select_signed = select_signed;
    p->rank_bias = rbias;
    return 0;
}

/* lora_forward(the arguments of moe_lora_parse)
 *   -> (out, selected or None, counts, the saved z with save_z or None) */
PyObject *
moe_py_lora_forward(PyObject *self, PyObject *args, PyObject *kw)
{
    moe_outs o = MOE_OUTS(4);
    moe_lora_params p;
    moe_status st;
    int save_z;

    if (moe_lora_parse(args, kw, &p, &save_z) < 0) {
        return NULL;
    }
    if (save_z) {
        p.save_z = p.kind == MOE_LORA_ADAPTERS
                       ? moe_out(&o, 3, NPY_FLOAT32, 3, p.n_tokens,
                                 p.select_k > 0 ? p.select_k : p.n_slots,
                                 p.rank)
                       : moe_out(&o, 3, NPY_FLOAT32, 2, p.n_tokens, p.rank, 0);
    }
    p.out = moe_out(&o, 0, NPY_FLOAT32, 2, p.n_tokens, p.d_out, 0);
    if (p.select_k > 0) {
        p.selected = moe_out(&o, 1, NPY_INT32, 2, p.n_tokens, p.select_k, 0);
    }
    p.counts = moe_out(&o, 2, NPY_INT64, 1,
                       p.kind == MOE_LORA_RANKS ? p.rank : p.n_adapters, 0, 0);
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_lora_forward(&p));
    return moe_outs_done(&o, st, NULL);
}

/*
 * lora_backward(args, kw, base_t, lora_a, lora_b, dy, *, z, dx, d_lora_a,
 *               d_lora_b, d_weights) -> (dx, d_lora_a, d_lora_b, d_weights),
 * each None unless asked for; z: the forward's saved z, or None.  args, kw: the forward's (FlyLoRA: its
 * selected ranks as ids, select_k 0); base_t the base's transpose packed as
 * a linear (1, d_in, d_out), or None; lora_a, lora_b the unpacked adapters.
 */
PyObject *
moe_py_lora_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"args", "kw", "base_t", "lora_a", "lora_b", "dy",
                             "z", "dx", "d_lora_a", "d_lora_b", "d_weights",
                             NULL};
    PyObject *fargs, *fkw, *bt_obj, *a_obj, *b_obj, *dy_obj, *z_obj = Py_None;
    int want[4] = {1, 1, 1, 1}, save_z;
    npy_intp ad[3], bd[3], dyd[2], zd[3];
    const moe_experts *bt = NULL;
    void *a, *b, *dy, *z;
    int nd_a, nd_b;
    moe_lora_params fp;
    moe_lora_backward_params p;
    moe_outs o = MOE_OUTS(4);
    moe_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!OOOO|$Opppp:lora_backward",
                                     kwlist, &PyTuple_Type, &fargs,
                                     &PyDict_Type, &fkw, &bt_obj, &a_obj,
                                     &b_obj, &dy_obj, &z_obj, &want[0],
                                     &want[1], &want[2], &want[3]) ||
        (bt_obj != Py_None && !(bt = moe_packed_arg(bt_obj, "base_t", 1))) ||
        moe_lora_parse(fargs, fkw, &fp, &save_z) < 0) {
        return NULL;
    }
    if (fp.select_k != 0) {
        PyErr_SetString(PyExc_ValueError, "lora_backward: pass the forward's "
                        "selected ranks as ids (select_k 0)");
        return NULL;
    }
    nd_a = fp.kind == MOE_LORA_ADAPTERS ? 3 : 2;
    nd_b = fp.kind == MOE_LORA_RANKS ? 2 : 3;
    ad[0] = fp.n_adapters;
    ad[nd_a - 2] = fp.rank;
    ad[nd_a - 1] = fp.d_in;
    bd[0] = fp.n_adapters;
    bd[nd_b - 2] = fp.d_out;
    bd[nd_b - 1] = fp.rank;
    dyd[0] = fp.n_tokens;
    dyd[1] = fp.d_out;
    zd[0] = fp.n_tokens;
    zd[1] = fp.kind == MOE_LORA_ADAPTERS ? fp.n_slots : fp.rank;
    zd[2] = fp.rank;
    if (!(a = moe_arg(a_obj, "lora_a", NPY_FLOAT32, nd_a, ad, 0)) ||
        !(b = moe_arg(b_obj, "lora_b", NPY_FLOAT32, nd_b, bd, 0)) ||
        !(dy = moe_arg(dy_obj, "dy", NPY_FLOAT32, 2, dyd, 0)) ||
        moe_opt_arg(z_obj, "z", NPY_FLOAT32,
                    fp.kind == MOE_LORA_ADAPTERS ? 3 : 2, zd, &z) < 0) {
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.forward = &fp;
    p.base_t = bt;
    p.lora_a = MOE_DATA(a, float);
    p.lora_b = MOE_DATA(b, float);
    p.dy = MOE_DATA(dy, float);
    p.z = z;
    if (want[0]) {
        p.dx = moe_out(&o, 0, NPY_FLOAT32, 2, fp.n_tokens, fp.d_in, 0);
    }
    if (want[1]) {
        p.d_lora_a = moe_out(&o, 1, NPY_FLOAT32, nd_a, ad[0], ad[1],
                             nd_a == 3 ? ad[2] : 0);
    }
    if (want[2]) {
        p.d_lora_b = moe_out(&o, 2, NPY_FLOAT32, nd_b, bd[0], bd[1],
                             nd_b == 3 ? bd[2] : 0);
    }
    if (want[3]) {
        p.d_weights = moe_out(&o, 3, NPY_FLOAT32, 2, fp.n_tokens, fp.n_slots,
                              0);
    }
    if (o.failed) {
        return moe_outs_fail(&o);
    }
    MOE_COMPUTE(st, moe_lora_backward(&p));
    return moe_outs_done(&o, st, NULL);
}
