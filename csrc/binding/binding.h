/*
 * binding/binding.h - private to csrc/binding/, the only files that include
 * Python.h or NumPy headers: what the binding's files share.  The wrappers
 * parse keywords (PyArg_ParseTupleAndKeywords), check their arrays with the
 * helpers of arrays.c, fill the op's params struct, run the core with the GIL
 * released (MOE_COMPUTE) and end through moe_outs_done: one exit for the
 * result and for every error.
 *
 * Who checks what (one owner per check):
 *   moe/ (Python)  every user-facing argument: types, ranges, option names,
 *                  with the messages users read; it runs first.
 *   the binding    memory safety only: each array's type, dtype, layout and
 *                  shape against the others, and a value that sizes an output
 *                  it allocates (top_k, widths) or indexes memory; it does not
 *                  repeat moe/'s option checks except as enum ranges.
 *   the core       its own invariants (csrc/ops/backend.c for the public ops),
 *                  whoever calls it: C users have no moe/ in front.
 */
#ifndef MOE_BINDING_H
#define MOE_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
/* one NumPy C-API table for the whole extension, filled in module.c */
#define PY_ARRAY_UNIQUE_SYMBOL moe_numpy_api
#ifndef MOE_BINDING_IMPORTS_NUMPY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <string.h>

#include "moe.h"

/* ---- errors, the GIL and Ctrl-C (module.c) ----------------------------- */

/* The one place a moe_status becomes a Python exception; returns NULL. */
PyObject *moe_raise(moe_status st);

/* Our SIGINT handler in front of Python's while the core runs. */
int  moe_sigint_begin(void);
void moe_sigint_end(int installed);

/* Run a core call with the GIL released and Ctrl-C honoured. */
#define MOE_COMPUTE(st, call)                                               \
    do {                                                                    \
        int moe_sig_ = moe_sigint_begin();                                  \
        Py_BEGIN_ALLOW_THREADS                                              \
        (st) = (call);                                                      \
        Py_END_ALLOW_THREADS                                                \
        moe_sigint_end(moe_sig_);                                           \
    } while (0)

/* ---- argument checks (arrays.c) ----------------------------------------- */

#define MOE_DATA(arr, type) ((type *)PyArray_DATA((PyArrayObject *)(arr)))

/*
 * obj must be a C-contiguous, aligned ndarray of typenum and rank ndim; each
 * dims[i] >= 0 must match, dims[i] < 0 is filled in from the array.  The
 * error names the argument and the expected shape.  A borrowed pointer, or
 * NULL with an exception set.
 */
PyArrayObject *moe_arg(PyObject *obj, const char *name, int typenum,
                       int ndim, npy_intp *dims, int writable);
/* Like moe_arg, but None gives *data = NULL and is not an error: 0 or -1. */
/* An expert weight (n_experts, rows, cols), or None (*data NULL): as
 * moe_arg, but any non-negative whole-element strides are taken (a view:
 * no copy), their element counts in *st (all 0 for C-contiguous). */
int moe_weight_arg(PyObject *obj, const char *name, int typenum,
                   npy_intp *dims, void **data, moe_wstrides *st);
int moe_opt_arg(PyObject *obj, const char *name, int typenum, int ndim,
                npy_intp *dims, void **data);
/* Router logits: (n_tokens, n_experts) float64 with 1..2^31-1 experts. */
PyArrayObject *moe_logits_arg(PyObject *obj, npy_intp *ld);
/* A new float32 array of dims; big ones reuse the blocks of freed ones
 * (a small cache, so steady training does not fault fresh pages in). */
PyArrayObject *moe_new_recycled(int ndim, const npy_intp *dims);
/* Free the cached blocks. */
void moe_recycle_clear(void);
/* A new (d0[, d1]) array, or NULL with an exception set. */
PyArrayObject *moe_new(int ndim, npy_intp d0, npy_intp d1, int typenum);

/* Each returns 0, or -1 with a ValueError naming the argument. */
int moe_check_enum(long value, long n, const char *name);
/* "<name> must be in lo..<hi_name>=hi, got value" */
int moe_check_range(long long value, long long lo, long long hi,
                    const char *name, const char *hi_name);
/* "<name> must be >= lo, got value" */
int moe_check_min(long long value, long long lo, const char *name);
/* a size the core keeps in int32_t: `message` when it is larger */
int moe_check_int32(npy_intp value, const char *message);

/* An activation code and its constants into act: 0 or -1. */
int moe_act_arg(int activation, float alpha, float limit,
                moe_act_params *act);

/* ---- packed weights (arrays.c) ------------------------------------------ */

#define MOE_EXPERTS_CAPSULE "moe.experts"
/* LoRA on experts: the capsule holds a reference to the experts' capsule
 * (its context), so the pack it was laid out for outlives it. */
#define MOE_LORA_CAPSULE "moe.expert_lora"

/* A packed-weights capsule; linear: from pack_linear, else pack_experts. */
const moe_experts *moe_packed_arg(PyObject *obj, const char *name,
                                  int linear);
const moe_experts *moe_experts_arg(PyObject *obj, const char *name);
/* None -> NULL; else an expert LoRA capsule. Returns -1 with an error. */
int moe_lora_arg(PyObject *obj, const moe_expert_lora **lora);
/* The unpacked weights a pack was made from, for a backward: gate (NULL if
 * ungated), up, down into w[0..2], checked against the pack's dtype (uint16
 * bits for bf16 / fp16) and shapes; shared: a shared expert's (no leading
 * expert axis, the names shared_w_*).  With st (routed only): strided
 * views too, their strides into st[0..2] (moe_weight_arg).  0, or -1 with
 * an exception set. */
int moe_unpacked_arg(const moe_experts *experts, int shared, PyObject *g_obj,
                     PyObject *u_obj, PyObject *d_obj, const void **w,
                     moe_wstrides *st);
/* The ending of a pack: raise for st, else w in a new capsule (w is freed
 * when that fails). */
PyObject *moe_experts_capsule(moe_status st, moe_experts *w);

/* ---- outputs and the one error exit (arrays.c) -------------------------- */

#define MOE_MAX_OUTS 8

/*
 * The arrays a wrapper returns, by their place in the result; a place left
 * empty is None there.  An allocation that fails sets `failed` (and the
 * exception); later ones then do nothing.
 */
typedef struct moe_outs {
    PyObject *item[MOE_MAX_OUTS];
    int       n;       /* places in the result; 1: the array alone */
    int       failed;
} moe_outs;

#define MOE_OUTS(n) {{NULL}, (n), 0}

/* A new array in place i of the result: its data, or NULL when it (or an
 * earlier one) failed.  NumPy gives even an empty array a data pointer. */
void *moe_out(moe_outs *o, int i, int typenum, int ndim, npy_intp d0,
              npy_intp d1, npy_intp d2);
/* moe_out for a float32 array from moe_new_recycled (gradients). */
void *moe_out_recycled(moe_outs *o, int i, int ndim, npy_intp d0, npy_intp d1,
                       npy_intp d2);
/* Drop the outputs; NULL (the exception is already set). */
PyObject *moe_outs_fail(moe_outs *o);
/*
 * The shared ending: for st != OK raise it and drop the outputs; else the
 * result: the array alone (n == 1, no extra), else the tuple of the places
 * followed by the values of `extra`, a parenthesised Py_BuildValue format
 * ("(Ldd)"); with n == 0, the value of `extra` alone.
 */
PyObject *moe_outs_done(moe_outs *o, moe_status st, const char *extra, ...);

/* ---- parses shared by a forward and its backward (ops.c) ----------------- */

/* route's arguments into p (logits, sizes, options): 0 or -1. */
int moe_route_parse(PyObject *args, PyObject *kw, moe_route_params *p);
/* combine's arrays (y, position, weights) into p, checked against each
 * other: 0 or -1. */
int moe_combine_arrays(PyObject *y_obj, PyObject *pos_obj, PyObject *w_obj,
                       moe_combine_params *p);
/* ffn_grouped's arguments into p (rows, experts, activation): 0 or -1. */
int moe_ffn_parse(PyObject *args, PyObject *kw, moe_ffn_params *p);

/* ---- the wrappers, for the method table in module.c --------------------- */

#define MOE_KW_WRAPPER(name) \
    PyObject *name(PyObject *self, PyObject *args, PyObject *kw)

/* ops.c: routing, dispatch / combine, packing, grouped FFN and linear */
MOE_KW_WRAPPER(moe_py_router_logits);
MOE_KW_WRAPPER(moe_py_route);
MOE_KW_WRAPPER(moe_py_route_expert_choice);
MOE_KW_WRAPPER(moe_py_route_dynamic);
MOE_KW_WRAPPER(moe_py_route_skip);
MOE_KW_WRAPPER(moe_py_update_expert_bias);
MOE_KW_WRAPPER(moe_py_dispatch);
MOE_KW_WRAPPER(moe_py_combine);
MOE_KW_WRAPPER(moe_py_pack_experts);
MOE_KW_WRAPPER(moe_py_ffn_grouped);
MOE_KW_WRAPPER(moe_py_pack_linear);
MOE_KW_WRAPPER(moe_py_linear_grouped);
MOE_KW_WRAPPER(moe_py_cuda_route);
PyObject *moe_py_experts_info(PyObject *self, PyObject *obj);
/* backward.c: the staged ops' backward */
MOE_KW_WRAPPER(moe_py_route_backward);
MOE_KW_WRAPPER(moe_py_combine_backward);
MOE_KW_WRAPPER(moe_py_dispatch_backward);
MOE_KW_WRAPPER(moe_py_ffn_grouped_backward);
MOE_KW_WRAPPER(moe_py_linear_backward);
MOE_KW_WRAPPER(moe_py_router_backward);
/* lora.c */
MOE_KW_WRAPPER(moe_py_pack_expert_lora);
MOE_KW_WRAPPER(moe_py_lora_forward);
MOE_KW_WRAPPER(moe_py_lora_backward);
/* layers.c: the layer (positional arguments), PEER and Soft MoE */
MOE_KW_WRAPPER(moe_py_layer_forward);
MOE_KW_WRAPPER(moe_py_layer_backward);
MOE_KW_WRAPPER(moe_py_peer_forward);
MOE_KW_WRAPPER(moe_py_peer_backward);
MOE_KW_WRAPPER(moe_py_soft_moe_forward);
MOE_KW_WRAPPER(moe_py_soft_moe_backward);

#endif /* MOE_BINDING_H */
