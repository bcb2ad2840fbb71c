/*
 * binding/module.c - the moe._C extension module: its method table, the one
 * map from moe_status to a Python exception, the GIL / Ctrl-C handling of
 * MOE_COMPUTE, the utilities (threads, build and CUDA info), the option lists
 * as tuples of names.  The wrappers are in ops.c, layers.c and lora.c; their
 * shared argument and output helpers in arrays.c (binding.h).  Friendlier
 * conversion lives in moe/_api.py.
 */
#define MOE_BINDING_IMPORTS_NUMPY /* import_array() is called here */
#include "binding.h"

#if defined(__linux__)
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MOE_HAVE_SIGINT 1
#endif

/* ---- errors ------------------------------------------------------------ */

/* The one place a moe_status becomes a Python exception. */
PyObject *
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

int
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

void
moe_sigint_end(int installed)
{
    if (installed) {
        sigaction(SIGINT, &moe_prev_sigint, NULL);
        moe_interrupt_watch(0);
    }
}
#else
int moe_sigint_begin(void) { return 0; }
void moe_sigint_end(int installed) { (void)installed; }
#endif

/* ---- utilities ---------------------------------------------------------- */

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
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s,s:s,s:i,s:O}", "version",
                         MOE_VERSION, "compiler", moe_build_compiler(),
                         "cpu_features", moe_cpu_features(), "isa",
                         moe_cpu_isa(), "bf16_dot", moe_cpu_bf16_dot(),
                         "int8_dot", moe_cpu_int8_dot(),
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

/* ---- module ----------------------------------------------------------- */

/*
 * A keyword wrapper: its docstring opens with the text signature, so
 * inspect.signature() and help() show the keywords.
 */
#define MOE_KW_METHOD(name, sig, doc)                                       \
    {#name, (PyCFunction)(void (*)(void))moe_py_##name,                     \
     METH_VARARGS | METH_KEYWORDS, #name "($module, " sig ")\n--\n\n" doc}

static PyMethodDef moe_methods[] = {
    MOE_KW_METHOD(router_logits, "x, router_weight",
                  "-> (n_tokens, n_experts) float64 logits"),
    MOE_KW_METHOD(route, "logits, top_k, scoring, renormalize, *, "
                  "routed_scaling=1.0, expert_bias=None, n_groups=1, "
                  "topk_groups=1, capacity_factor=0.0, allowed=None, "
                  "groups=None",
                  "-> (expert_ids, weights, counts, n_dropped, aux_loss, "
                  "z_loss)"),
    MOE_KW_METHOD(route_expert_choice, "logits, capacity, scoring",
                  "-> (token_ids, gates, n_experts_per_token, expert_ids, "
                  "weights)"),
    MOE_KW_METHOD(route_dynamic, "logits, mode, p, k_min, k_max, renormalize",
                  "-> (expert_ids, weights, n_selected)"),
    MOE_KW_METHOD(route_skip, "expert_ids, weights, threshold, renormalize",
                  "-> n_skipped; the arrays are changed in place"),
    MOE_KW_METHOD(update_expert_bias, "bias, counts, rate",
                  "bias is changed in place"),
    MOE_KW_METHOD(dispatch, "x, expert_ids, n_experts",
                  "-> (x_sorted, offsets, token_index, position)"),
    MOE_KW_METHOD(combine, "y, position, weights", "-> (n_tokens, d_model)"),
    MOE_KW_METHOD(pack_experts, "w_gate, w_up, w_down, dtype, *, b_gate=None, "
                  "b_up=None, b_down=None, expert_d_ff=None, "
                  "compute=0, w_gate_scales=None, w_up_scales=None, "
                  "w_down_scales=None, group_size=0", "-> packed experts"),
    {"experts_info", moe_py_experts_info, METH_O,
     "experts_info(packed) -> dict of sizes"},
    MOE_KW_METHOD(ffn_grouped, "x, token_index, offsets, experts, activation, "
                  "*, alpha=1.702, limit=7.0, lora=None",
                  "-> (n_rows, d_model)"),
    MOE_KW_METHOD(pack_expert_lora, "experts, rank, scaling, *, a_gate=None, "
                  "b_gate=None, a_up=None, b_up=None, a_down=None, "
                  "b_down=None", "-> packed LoRA on the experts"),
    MOE_KW_METHOD(pack_linear, "w, dtype, *, bias=None", "-> packed linear"),
    MOE_KW_METHOD(linear_grouped, "x, token_index, offsets, weights",
                  "-> (n_rows, d_out)"),
    MOE_KW_METHOD(lora_forward, "x, base, kind, lora_a, bank, n_adapters, "
                  "ids, weights, scaling, *, adapter_scaling=None, "
                  "select_k=0, select_signed=0, rank_bias=None, save_z=False",
                  "-> (out, selected, counts, saved z)"),
    MOE_KW_METHOD(lora_backward, "args, kw, base_t, lora_a, lora_b, dy, *, "
                  "z=None, dx=True, d_lora_a=True, d_lora_b=True, d_weights=True",
                  "-> (dx, d_lora_a, d_lora_b, d_weights)"),
    MOE_KW_METHOD(peer_forward, "x, w_query, sub_keys_1, sub_keys_2, u, v, "
                  "top_k, activation, *, return_routing=False",
                  "-> (out, expert_ids, gates)"),
    MOE_KW_METHOD(peer_backward, "args, kw, expert_ids, dy",
                  "-> (dx, d_w_query, d_sub_keys_1, d_sub_keys_2, used, d_u, d_v)"),
    {"set_num_threads", moe_py_set_num_threads, METH_O,
     "set_num_threads(n)"},
    {"get_num_threads", moe_py_get_num_threads, METH_NOARGS,
     "get_num_threads() -> int"},
    MOE_KW_METHOD(layer_forward, "x, router_weight, experts, top_k, "
                  "activation, *, expert_bias=None, scoring=0, renormalize=True, "
                  "routed_scaling=1.0, n_groups=1, topk_groups=1, "
                  "capacity_factor=0.0, shared_experts=None, "
                  "shared_gate_weight=None, router_bias=None, alpha=1.702, "
                  "limit=7.0, lora=None, null_kinds=None, null_values=None, "
                  "allowed=None, groups=None, want_out_norm=False, router=0, "
                  "router_p=0.0, k_min=1, skip_threshold=0.0, "
                  "skip_renormalize=False, save=False, save_hidden=False",
                  "-> (out, expert_ids, weights, counts, n_dropped, aux_loss, "
                  "z_loss, n_real, out_norm, saved)"),
    MOE_KW_METHOD(route_backward, "route_args, route_kwargs, expert_ids, "
                  "d_weights, *, aux_coef=0.0, z_coef=0.0", "-> d_logits"),
    MOE_KW_METHOD(combine_backward, "y, position, weights, d_out",
                  "-> (d_y, d_weights)"),
    MOE_KW_METHOD(dispatch_backward, "d_rows, position", "-> dx"),
    MOE_KW_METHOD(ffn_grouped_backward, "ffn_args, ffn_kwargs, dy, *, "
                  "w_gate=None, w_up=None, w_down=None, biases=False",
                  "-> (dx, d_w_gate, d_w_up, d_w_down, d_b_gate, d_b_up, "
                  "d_b_down)"),
    MOE_KW_METHOD(linear_backward, "x, w, dy, dtype", "-> (dx, d_w)"),
    MOE_KW_METHOD(router_backward, "x, router_weight, d_logits",
                  "-> (dx, d_router_weight)"),
    MOE_KW_METHOD(layer_backward, "forward_args, forward_kwargs, expert_ids, "
                  "weights, logits, y, shared, dy, *, w_gate=None, w_up=None, "
                  "w_down=None, shared_w_gate=None, shared_w_up=None, "
                  "shared_w_down=None, aux_coef=0.0, z_coef=0.0, "
                  "biases=False, hidden=None", "-> dict of gradients"),
    MOE_KW_METHOD(soft_moe_forward, "x, phi, experts, slots_per_expert, "
                  "activation, normalize, scale, temperature, *, across=False, "
                  "return_weights=False, alpha=1.702, limit=7.0, save=False",
                  "-> (out, dispatch, combine, saved ys)"),
    MOE_KW_METHOD(soft_moe_backward, "args, kw, ys, dy, *, w_gate=None, w_up, "
                  "w_down", "-> (dx, d_phi, d_w_gate, d_w_up, d_w_down, d_scale)"),
    {"build_info", moe_py_build_info, METH_NOARGS, "build information"},
    {"cuda_info", moe_py_cuda_info, METH_NOARGS,
     "cuda_info() -> {built, devices, reason}"},
    MOE_KW_METHOD(cuda_route, "logits, dtype, n_tokens, n_experts, top_k, "
                  "scoring, renormalize, expert_ids, weights, stream, *, "
                  "expert_bias=0, n_groups=1, topk_groups=1, "
                  "routed_scaling=1.0",
                  "the fused CUDA router on device pointers"),
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
#define MOE_FLOAT_NAME_(name, str, q) q ? NULL : str,
#define MOE_QUANT_NAME_(name, str, q) q ? str : NULL,
static const char *const moe_dtype_names[] = {
    MOE_DTYPE_LIST(MOE_FLOAT_NAME_) NULL};
static const char *const moe_quant_names[] = {
    MOE_DTYPE_LIST(MOE_QUANT_NAME_) NULL};
static const char *const moe_compute_names[] = {
    MOE_COMPUTE_LIST(MOE_NAME_2_) NULL};
static const char *const moe_router_grad_names[] = {
    MOE_ROUTER_GRAD_LIST(MOE_NAME_2_) NULL};
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
        moe_add_names(m, "QUANT_DTYPES", moe_quant_names,
                      MOE_DTYPE_COUNT) < 0 ||
        moe_add_names(m, "COMPUTE_DTYPES", moe_compute_names,
                      MOE_COMPUTE_COUNT) < 0 ||
        moe_add_names(m, "ROUTERS", moe_router_names, MOE_ROUTER_COUNT) < 0 ||
        moe_add_names(m, "ROUTER_GRADS", moe_router_grad_names,
                      MOE_ROUTER_GRAD_COUNT) < 0 ||
        moe_add_names(m, "NULL_KINDS", moe_null_names, MOE_NULL_COUNT) < 0 ||
        moe_add_names(m, "PEER_ACTIVATIONS", moe_peer_activation_names,
                      MOE_PEER_ACTIVATION_COUNT) < 0) {
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
