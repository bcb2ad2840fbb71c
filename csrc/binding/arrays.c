/*
 * binding/arrays.c - what comes into the binding and what goes back: every
 * array is checked here (type, dtype, layout, shape) so that no call from
 * Python can reach the core with memory it does not own; the range checks
 * and packed-weight capsules; the outputs a wrapper allocates and the one
 * exit that returns them or drops them on an error.
 */
#include <stdarg.h>

#include "binding.h"

#include <stdlib.h>

/* ---- arrays in ------------------------------------------------------------ */

/* moe_arg, and with st != NULL a 3-d array of any non-negative strides that
 * are whole elements (their element counts go to *st). */
static PyArrayObject *
moe_arg_strided(PyObject *obj, const char *name, int typenum, int ndim,
                npy_intp *dims, int writable, moe_wstrides *st)
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
    if (st != NULL && PyArray_NDIM(arr) == 3 && PyArray_ISALIGNED(arr) &&
        PyArray_ISNOTSWAPPED(arr) && !PyArray_ISCARRAY_RO(arr)) {
        const npy_intp es = PyArray_ITEMSIZE(arr);
        npy_intp el[3];
        for (i = 0; i < 3; i++) {
            const npy_intp b = PyArray_STRIDE(arr, i);
            if (b < 0 || b % es != 0) {
                PyErr_Format(PyExc_ValueError, "%s must have non-negative "
                             "strides of whole elements, got %lld bytes in "
                             "dimension %d", name, (long long)b, i);
                return NULL;
            }
            el[i] = b / es;
        }
        *st = (moe_wstrides){el[0], el[1], el[2]};
    }
    else if (!PyArray_ISCARRAY_RO(arr) ||
             (writable && !PyArray_ISWRITEABLE(arr))) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous, aligned%s"
                     " array%s", name, writable ? ", writable" : "",
                     st ? " (or an aligned 3-d view in native byte order)" : "");
        return NULL;
    }
    else if (st != NULL) {
        *st = (moe_wstrides){0, 0, 0}; /* dense */
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

PyArrayObject *
moe_arg(PyObject *obj, const char *name, int typenum, int ndim, npy_intp *dims,
        int writable)
{
    return moe_arg_strided(obj, name, typenum, ndim, dims, writable, NULL);
}

int
moe_weight_arg(PyObject *obj, const char *name, int typenum, npy_intp *dims,
               void **data, moe_wstrides *st)
{
    PyArrayObject *arr;

    *data = NULL;
    *st = (moe_wstrides){0, 0, 0};
    if (obj == Py_None) {
        return 0;
    }
    arr = moe_arg_strided(obj, name, typenum, 3, dims, 0, st);
    if (arr == NULL) {
        return -1;
    }
    *data = PyArray_DATA(arr);
    return 0;
}

int
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

PyArrayObject *
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

/* ---- recycled big float32 arrays (gradients) -------------------------- */

/*
 * Fresh memory costs a page fault per page on first touch, and glibc maps
 * every block past 32 MiB fresh: a training step that returns ~100 MiB of
 * weight gradients would spend more time faulting than computing.  Freed
 * big arrays of ours keep their block in a small cache (under the GIL:
 * capsule destructors and allocations both run with it held) for the next
 * array of the same size.
 */
#define MOE_RECYCLE_MIN   (1u << 20) /* smaller arrays: NumPy's allocator */
#define MOE_RECYCLE_SLOTS 16
#define MOE_RECYCLE_BYTES ((size_t)1 << 30)

static struct { void *ptr; size_t size; } moe_recycle[MOE_RECYCLE_SLOTS];
static size_t moe_recycle_bytes;

static void
moe_recycle_capsule(PyObject *cap)
{
    void *ptr = PyCapsule_GetPointer(cap, "moe.recycled");
    size_t size = (size_t)PyCapsule_GetContext(cap);
    int i;

    if (ptr == NULL) {
        PyErr_Clear();
        return;
    }
    for (i = 0; i < MOE_RECYCLE_SLOTS; i++) {
        if (moe_recycle[i].ptr == NULL &&
            moe_recycle_bytes + size <= MOE_RECYCLE_BYTES) {
            moe_recycle[i].ptr = ptr;
            moe_recycle[i].size = size;
            moe_recycle_bytes += size;
            return;
        }
    }
    free(ptr);
}

void
moe_recycle_clear(void)
{
    int i;

    for (i = 0; i < MOE_RECYCLE_SLOTS; i++) {
        free(moe_recycle[i].ptr);
        moe_recycle[i].ptr = NULL;
    }
    moe_recycle_bytes = 0;
}

PyArrayObject *
moe_new_recycled(int ndim, const npy_intp *dims)
{
    size_t size = sizeof(float);
    void *ptr = NULL;
    PyObject *arr, *cap;
    int i;

    for (i = 0; i < ndim; i++) {
        size *= (size_t)dims[i];
    }
    if (size < MOE_RECYCLE_MIN) {
        return (PyArrayObject *)PyArray_SimpleNew(ndim, (npy_intp *)dims,
                                                  NPY_FLOAT32);
    }
    for (i = 0; i < MOE_RECYCLE_SLOTS && ptr == NULL; i++) {
        if (moe_recycle[i].ptr != NULL && moe_recycle[i].size == size) {
            ptr = moe_recycle[i].ptr;
            moe_recycle[i].ptr = NULL;
            moe_recycle_bytes -= size;
        }
    }
    if (ptr == NULL && (ptr = aligned_alloc(64, (size + 63) / 64 * 64)) == NULL) {
        return (PyArrayObject *)PyErr_NoMemory();
    }
    cap = PyCapsule_New(ptr, "moe.recycled", moe_recycle_capsule);
    if (cap == NULL || PyCapsule_SetContext(cap, (void *)size) < 0) {
        Py_XDECREF(cap);
        free(ptr);
        return NULL;
    }
    arr = PyArray_SimpleNewFromData(ndim, (npy_intp *)dims, NPY_FLOAT32, ptr);
    if (arr == NULL || PyArray_SetBaseObject((PyArrayObject *)arr, cap) < 0) {
        Py_XDECREF(arr);
        Py_DECREF(cap); /* frees or caches ptr */
        return NULL;
    }
    return (PyArrayObject *)arr;
}

PyArrayObject *
moe_new(int ndim, npy_intp d0, npy_intp d1, int typenum)
{
    npy_intp dims[2] = {d0, d1};
    return (PyArrayObject *)PyArray_SimpleNew(ndim, dims, typenum);
}

/* ---- options in ----------------------------------------------------------- */

int
moe_check_enum(long value, long n, const char *name)
{
    if (value < 0 || value >= n) {
        PyErr_Format(PyExc_ValueError, "%s code must be in 0..%ld, got %ld",
                     name, n - 1, value);
        return -1;
    }
    return 0;
}

int
moe_check_range(long long value, long long lo, long long hi, const char *name,
                const char *hi_name)
{
    if (value < lo || value > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in %lld..%s=%lld, got %lld",
                     name, lo, hi_name, hi, value);
        return -1;
    }
    return 0;
}

int
moe_check_min(long long value, long long lo, const char *name)
{
    if (value < lo) {
        PyErr_Format(PyExc_ValueError, "%s must be >= %lld, got %lld", name, lo,
                     value);
        return -1;
    }
    return 0;
}

int
moe_check_int32(npy_intp value, const char *message)
{
    if (value > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, message);
        return -1;
    }
    return 0;
}

int
moe_act_arg(int activation, float alpha, float limit, moe_act_params *act)
{
    if (moe_check_enum(activation, MOE_ACTIVATION_COUNT, "activation") < 0) {
        return -1;
    }
    act->activation = (moe_activation)activation;
    act->alpha = alpha;
    act->limit = limit;
    return 0;
}

/* ---- packed weights ------------------------------------------------------- */

const moe_experts *
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

const moe_experts *
moe_experts_arg(PyObject *obj, const char *name)
{
    return moe_packed_arg(obj, name, 0);
}

int
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

static void
moe_experts_capsule_free(PyObject *capsule)
{
    moe_experts_free(PyCapsule_GetPointer(capsule, MOE_EXPERTS_CAPSULE));
}

PyObject *
moe_experts_capsule(moe_status st, moe_experts *w)
{
    PyObject *capsule;

    if (st != MOE_STATUS_OK) {
        return moe_raise(st);
    }
    capsule = PyCapsule_New(w, MOE_EXPERTS_CAPSULE, moe_experts_capsule_free);
    if (capsule == NULL) {
        moe_experts_free(w);
    }
    return capsule;
}

/* ---- outputs and the one exit --------------------------------------------- */

void *
moe_out(moe_outs *o, int i, int typenum, int ndim, npy_intp d0, npy_intp d1,
        npy_intp d2)
{
    npy_intp dims[3] = {d0, d1, d2};
    PyObject *arr;

    if (o->failed) {
        return NULL;
    }
    arr = PyArray_SimpleNew(ndim, dims, typenum);
    if (arr == NULL) {
        o->failed = 1;
        return NULL;
    }
    Py_XSETREF(o->item[i], arr);
    return PyArray_DATA((PyArrayObject *)arr);
}

int
moe_unpacked_arg(const moe_experts *experts, int shared, PyObject *g_obj,
                 PyObject *u_obj, PyObject *d_obj, const void **w,
                 moe_wstrides *st)
{
    static const char *names[2][3] = {
        {"w_gate", "w_up", "w_down"},
        {"shared_w_gate", "shared_w_up", "shared_w_down"}};
    PyObject *objs[3] = {g_obj, u_obj, d_obj};
    moe_experts_info info;
    npy_intp dims[3];
    void *data;
    int i, typenum;

    moe_experts_get_info(experts, &info);
    if (moe_dtype_quantized(info.dtype)) {
        PyErr_SetString(PyExc_ValueError, "quantized experts have no backward "
                        "(train float32 / bfloat16 / float16 experts, then "
                        "quantize)");
        return -1;
    }
    typenum = info.dtype == MOE_DTYPE_F32 ? NPY_FLOAT32 : NPY_UINT16;
    for (i = 0; i < 3; i++) {
        /* (E, F, d) for gate and up, (E, d, F) for down; shared: no E */
        const npy_intp rows = i < 2 ? info.d_ff : info.d_model;
        const npy_intp cols = i < 2 ? info.d_model : info.d_ff;
        dims[0] = shared ? rows : info.n_experts;
        dims[1] = shared ? cols : rows;
        dims[2] = cols;
        if ((st != NULL ? moe_weight_arg(objs[i], names[shared != 0][i],
                                         typenum, dims, &data, &st[i])
                        : moe_opt_arg(objs[i], names[shared != 0][i], typenum,
                                      shared ? 2 : 3, dims, &data)) < 0) {
            return -1;
        }
        if (data == NULL && (i > 0 || info.gated)) {
            PyErr_Format(PyExc_ValueError, "%s is required (the unpacked weights "
                         "the experts were packed from)", names[shared != 0][i]);
            return -1;
        }
        w[i] = data;
    }
    return 0;
}

void *
moe_out_recycled(moe_outs *o, int i, int ndim, npy_intp d0, npy_intp d1,
                 npy_intp d2)
{
    const npy_intp dims[3] = {d0, d1, d2};
    PyArrayObject *arr;

    if (o->failed) {
        return NULL;
    }
    if ((arr = moe_new_recycled(ndim, dims)) == NULL) {
        o->failed = 1;
        return NULL;
    }
    Py_XSETREF(o->item[i], (PyObject *)arr);
    return PyArray_DATA(arr);
}

static void
moe_outs_clear(moe_outs *o)
{
    int i;

    for (i = 0; i < MOE_MAX_OUTS; i++) {
        Py_CLEAR(o->item[i]);
    }
}

PyObject *
moe_outs_fail(moe_outs *o)
{
    moe_outs_clear(o);
    return NULL;
}

PyObject *
moe_outs_done(moe_outs *o, moe_status st, const char *extra, ...)
{
    PyObject *tail = NULL, *res, *v;
    Py_ssize_t n_tail = 0, i;
    va_list va;

    if (st != MOE_STATUS_OK) {
        moe_raise(st);
        return moe_outs_fail(o);
    }
    if (extra == NULL && o->n == 1) {
        res = o->item[0];
        o->item[0] = NULL;
        return res;
    }
    if (extra != NULL) {
        va_start(va, extra);
        tail = Py_VaBuildValue(extra, va);
        va_end(va);
        if (tail == NULL || o->n == 0) {
            moe_outs_clear(o);
            return tail;
        }
        n_tail = PyTuple_GET_SIZE(tail); /* extra is "(...)": a tuple */
    }
    res = PyTuple_New(o->n + n_tail);
    for (i = 0; res != NULL && i < o->n + n_tail; i++) {
        v = i < o->n ? o->item[i] : PyTuple_GET_ITEM(tail, i - o->n);
        v = v != NULL ? v : Py_None;
        Py_INCREF(v);
        PyTuple_SET_ITEM(res, i, v);
    }
    Py_XDECREF(tail);
    moe_outs_clear(o);
    return res;
}
