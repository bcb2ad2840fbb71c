/*
 * compose/lora.c - mixtures of LoRA experts composed from the public ops: the
 * shrink z = A x is a grouped linear (grouped by adapter when each adapter
 * has its own A), and the expand is a low-rank update fused into the base
 * linear's output tiles.  Backend-neutral: it only calls csrc/moe.h.
 *
 * Each token's result is a function of its own row, its slots and the
 * weights only: batch composition and thread count change no bits.
 */
#include "moe_impl.h"

#include <math.h>
#include <string.h>

static float
moe_lora_scale(const moe_lora_params *p, int32_t e)
{
    return p->adapter_scaling ? p->adapter_scaling[e] : p->scaling;
}

/* Selection key of rank value v: NaN sorts below everything. */
static float
moe_lora_key(const moe_lora_params *p, float v, int32_t j)
{
    float key = p->select_signed ? v : fabsf(v);
    if (p->rank_bias != NULL) {
        key += p->rank_bias[j];
    }
    return isnan(key) ? -INFINITY : key;
}

/* FlyLoRA's rank selection: top select_k keys of each row of z. */
static void
moe_lora_select(const moe_lora_params *p, const float *z)
{
    const int32_t r = p->rank, k = p->select_k;
    int64_t t;
    int32_t i, j, n;

    for (t = 0; t < p->n_tokens; t++) {
        int32_t *sel = p->selected + t * k;
        const float *zt = z + t * r;
        n = 0;
        /* Insertion into a sorted list: key descending, rank ascending. */
        for (j = 0; j < r; j++) {
            float key = moe_lora_key(p, zt[j], j);
            if (n == k && key <= moe_lora_key(p, zt[sel[k - 1]], sel[k - 1])) {
                continue;
            }
            i = n < k ? n++ : k - 1;
            while (i > 0 &&
                   key > moe_lora_key(p, zt[sel[i - 1]], sel[i - 1])) {
                sel[i] = sel[i - 1];
                i--;
            }
            sel[i] = j;
        }
    }
}

static moe_status
moe_lora_check(const moe_lora_params *p)
{
    const int32_t n_a = p->kind == MOE_LORA_ADAPTERS ? p->n_adapters : 1;
    const int32_t n_ids = p->kind == MOE_LORA_RANKS ? p->rank : p->n_adapters;
    int64_t i;

    if (p->kind != MOE_LORA_ADAPTERS && p->kind != MOE_LORA_SHARED_A &&
        p->kind != MOE_LORA_RANKS) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "unknown LoRA kind %d",
                             (int)p->kind);
    }
    if (p->rank < 1 || p->n_adapters < 1 || p->n_slots < 0 ||
        p->n_tokens < 0 || p->d_in < 0 || p->d_out < 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "LoRA sizes: rank >= 1, "
                             "n_adapters >= 1 and the rest >= 0 required");
    }
    if (p->lora_a == NULL || !p->lora_a->linear ||
        p->lora_a->n_experts != n_a || p->lora_a->d_model != p->rank ||
        p->lora_a->d_ff != p->d_in) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "lora_a must be a packed "
                             "linear of shape (%d, rank=%d, d_in=%lld)", n_a,
                             p->rank, (long long)p->d_in);
    }
    if (p->bank == NULL || !p->bank->linear || p->bank->n_experts != 1 ||
        p->bank->dtype != MOE_DTYPE_F32 || p->bank->d_model != p->d_out ||
        p->bank->d_ff != (int64_t)(p->kind == MOE_LORA_RANKS ? 1 : p->n_adapters) *
                         p->rank) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "bank must be an fp32 "
                             "packed linear of shape (1, d_out=%lld, %lld)",
                             (long long)p->d_out,
                             (long long)(p->kind == MOE_LORA_RANKS
                                             ? 1 : p->n_adapters) * p->rank);
    }
    if (p->base != NULL &&
        (!p->base->linear || p->base->n_experts != 1 ||
         p->base->d_model != p->d_out || p->base->d_ff != p->d_in)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "base must be a packed "
                             "linear of shape (1, d_out=%lld, d_in=%lld)",
                             (long long)p->d_out, (long long)p->d_in);
    }
    if (p->select_k > 0) {
        if (p->kind != MOE_LORA_RANKS || p->select_k > p->rank ||
            p->n_slots != p->select_k || p->selected == NULL ||
            p->weights != NULL) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "rank selection needs"
                                 " kind RANKS, select_k in [1, rank=%d] slots"
                                 " and no weights", p->rank);
        }
        return MOE_STATUS_OK;
    }
    if (p->ids == NULL && p->n_slots > 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "ids are required");
    }
    for (i = 0; i < p->n_tokens * p->n_slots; i++) {
        if (p->ids[i] < -1 || p->ids[i] >= n_ids) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "%s ids must be in [0, %d) or -1, got %d at "
                                 "token %lld, slot %lld",
                                 p->kind == MOE_LORA_RANKS ? "rank"
                                                           : "adapter",
                                 n_ids, p->ids[i],
                                 (long long)(i / p->n_slots),
                                 (long long)(i % p->n_slots));
        }
    }
    return MOE_STATUS_OK;
}

/* The (token, slot) rows grouped by adapter (ADAPTERS; SHARED_A's heads). */
typedef struct moe_lora_rows {
    int64_t *offsets;     /* (n_adapters + 1,)                          */
    int64_t *position;    /* (n_tokens * n_slots,) row of each slot, -1 */
    int64_t *token_index; /* (n_rows,)                                  */
    int64_t  n_rows;
} moe_lora_rows;

static void
moe_lora_rows_free(moe_lora_rows *g)
{
    free(g->offsets);
    free(g->position);
    free(g->token_index);
    memset(g, 0, sizeof(*g));
}

static moe_status
moe_lora_group(const moe_lora_params *p, const int32_t *ids, moe_lora_rows *g)
{
    moe_dispatch_params dp;
    moe_status st;

    memset(g, 0, sizeof(*g));
    g->offsets = moe_alloc((size_t)p->n_adapters + 1, sizeof(int64_t));
    g->position = moe_alloc((size_t)(p->n_tokens * p->n_slots), sizeof(int64_t));
    if (!g->offsets || !g->position) {
        moe_lora_rows_free(g);
        return MOE_STATUS_ALLOC;
    }
    dp.expert_ids = ids;
    dp.n_tokens = p->n_tokens;
    dp.top_k = p->n_slots;
    dp.n_experts = p->n_adapters;
    dp.offsets = g->offsets;
    dp.position = g->position;
    dp.token_index = NULL;
    if ((st = moe_dispatch_count(&dp)) != MOE_STATUS_OK) {
        moe_lora_rows_free(g);
        return st;
    }
    g->n_rows = g->offsets[p->n_adapters];
    dp.token_index = g->token_index =
        moe_alloc((size_t)g->n_rows, sizeof(int64_t));
    if (g->token_index == NULL) {
        moe_lora_rows_free(g);
        return MOE_STATUS_ALLOC;
    }
    if ((st = moe_dispatch_build(&dp)) != MOE_STATUS_OK) {
        moe_lora_rows_free(g);
    }
    return st;
}

/* The shrink z = A x: per grouped row (g given: ADAPTERS) or per token. */
static moe_status
moe_lora_shrink(const moe_lora_params *p, const moe_lora_rows *g, float *z)
{
    int64_t whole[2] = {0, p->n_tokens};
    moe_linear_params lp;

    memset(&lp, 0, sizeof(lp));
    lp.x = p->x;
    lp.token_index = g ? g->token_index : NULL;
    lp.n_tokens = p->n_tokens;
    lp.offsets = g ? g->offsets : whole;
    lp.n_rows = g ? g->n_rows : p->n_tokens;
    lp.weights = p->lora_a;
    lp.out = z;
    return moe_linear_grouped(&lp);
}

moe_status
moe_lora_forward(const moe_lora_params *p)
{
    const int64_t T = p->n_tokens;
    const int32_t r = p->rank, S = p->n_slots;
    const int32_t per_slot = p->kind == MOE_LORA_RANKS ? 1 : r;
    const int32_t *ids = p->select_k > 0 ? p->selected : p->ids;
    const int grouped = p->kind == MOE_LORA_ADAPTERS;
    int64_t whole[2] = {0, T}, n_rows = T, t;
    float *z = NULL, *coef = NULL;
    int32_t *index = NULL, s, i;
    moe_lora_rows g;
    moe_linear_params lp;
    moe_lowrank lr;
    moe_experts *zero = NULL;
    moe_status st;

    MOE_TRY(moe_lora_check(p));
    memset(&g, 0, sizeof(g));
    if (grouped) {
        /* (rank selection needs RANKS: ids are known here) */
        MOE_TRY(moe_lora_group(p, ids, &g));
        n_rows = g.n_rows;
    }
    st = MOE_STATUS_ALLOC;
    z = moe_alloc((size_t)(n_rows * r), sizeof(float));
    coef = moe_alloc((size_t)(T * S * per_slot), sizeof(float));
    index = moe_alloc((size_t)(T * S * per_slot), sizeof(int32_t));
    if (!z || !coef || !index) {
        goto done;
    }

    /* shrink: z = A x (rows grouped by adapter for ADAPTERS) */
    if ((st = moe_lora_shrink(p, grouped ? &g : NULL, z)) != MOE_STATUS_OK) {
        goto done;
    }
    if (p->select_k > 0) {
        moe_lora_select(p, z);
    }

    /* the expand's terms, slot by slot, rank by rank */
    for (t = 0; t < T; t++) {
        for (s = 0; s < S; s++) {
            const int32_t e = ids[t * S + s];
            const float w = p->weights ? p->weights[t * S + s] : 1.0f;
            float *c = coef + (t * S + s) * per_slot;
            int32_t *x = index + (t * S + s) * per_slot;
            if (e < 0) {
                for (i = 0; i < per_slot; i++) {
                    c[i] = 0.0f;
                    x[i] = -1;
                }
            }
            else if (p->kind == MOE_LORA_RANKS) {
                c[0] = p->scaling * w * z[t * r + e];
                x[0] = e;
            }
            else {
                const float *zr = z + (p->kind == MOE_LORA_ADAPTERS
                                           ? g.position[t * S + s] : t) * r;
                const float cw = moe_lora_scale(p, e) * w;
                for (i = 0; i < r; i++) {
                    c[i] = cw * zr[i];
                    x[i] = e * r + i;
                }
            }
        }
    }
    if (p->counts != NULL) {
        const int32_t n_c = p->kind == MOE_LORA_RANKS ? r : p->n_adapters;
        memset(p->counts, 0, sizeof(int64_t) * (size_t)n_c);
        for (t = 0; t < T * S; t++) {
            if (ids[t] >= 0) {
                p->counts[ids[t]]++;
            }
        }
    }

    lr.coef = coef;
    lr.index = index;
    lr.n_terms = S * per_slot;
    lr.bank = p->bank;
    memset(&lp, 0, sizeof(lp));
    lp.x = p->x;
    lp.n_tokens = T;
    lp.offsets = whole;
    lp.n_rows = T;
    lp.lowrank = &lr;
    lp.out = p->out;
    if (p->base == NULL) {
        /* The update alone: a base with no inputs (its output rows are 0). */
        moe_linear_pack_params zp;
        memset(&zp, 0, sizeof(zp));
        zp.w = p->x;
        zp.dtype = MOE_DTYPE_F32;
        zp.n_groups = 1;
        zp.d_out = p->d_out;
        if ((st = moe_linear_pack(&zp, &zero)) != MOE_STATUS_OK) {
            goto done;
        }
        lp.x = NULL;
        lp.weights = zero;
    }
    else {
        lp.weights = p->base;
    }
    st = moe_linear_grouped(&lp);
done:
    moe_experts_free(zero);
    moe_lora_rows_free(&g);
    free(z);
    free(coef);
    free(index);
    return st;
}

/* ---- backward ---------------------------------------------------------- */

/* A grouped linear's backward on fp32 weights (n_groups, d_out, d_in). */
static moe_status
moe_lora_linear_backward(const float *x, int64_t n_tokens, const int64_t *offsets,
                         int32_t n_groups, const int64_t *token_index,
                         const float *w, int64_t d_in, int64_t d_out,
                         const float *dy, float *dx, float *d_w)
{
    moe_linear_backward_params lb;

    memset(&lb, 0, sizeof(lb));
    lb.x = x;
    lb.w = w;
    lb.dtype = MOE_DTYPE_F32;
    lb.n_tokens = n_tokens;
    lb.d_in = d_in;
    lb.d_out = d_out;
    lb.offsets = offsets;
    lb.n_groups = n_groups;
    lb.token_index = token_index;
    lb.dy = dy;
    lb.dx = dx;
    lb.d_w = d_w;
    return moe_linear_backward(&lb);
}

/*
 * The expand of slot (t, s), c = scale * w * z: ADAPTERS / SHARED_A run it
 * as a grouped linear over the slots' rows (x = c z rows, W = B_e), RANKS
 * as one linear over a dense (T, rank) coefficient matrix (W = B).  Then
 * d_weights = scale <dc, z> and dz = scale * w * dc per slot; dz lands in
 * (n_rows, r) rows (ADAPTERS) or, summed in slot order, per token.
 */
moe_status
moe_lora_backward(const moe_lora_backward_params *b)
{
    const moe_lora_params *p = b->forward;
    const int64_t T = p ? p->n_tokens : 0, din = p ? p->d_in : 0;
    const int64_t dout = p ? p->d_out : 0;
    const int32_t r = p ? p->rank : 0, S = p ? p->n_slots : 0;
    const int32_t E = p ? p->n_adapters : 0;
    const int ranks = p && p->kind == MOE_LORA_RANKS;
    const int per_row = p && p->kind == MOE_LORA_ADAPTERS;
    const int need_dz = b->dx != NULL || b->d_lora_a != NULL;
    moe_lora_rows g;
    int64_t n_rows, n_z, t, i;
    float *z = NULL, *c = NULL, *dc = NULL, *dz = NULL, *dyr = NULL;
    float *dxl = NULL;
    moe_status st;
    int32_t s, j;

    if (p == NULL || b->dy == NULL || b->lora_a == NULL || b->lora_b == NULL ||
        p->select_k != 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "LoRA backward: needs "
                             "the forward's params (select_k 0: its selected "
                             "ranks as ids), dy, lora_a and lora_b");
    }
    MOE_TRY(moe_lora_check(p));
    memset(&g, 0, sizeof(g));
    if (!ranks) {
        MOE_TRY(moe_lora_group(p, p->ids, &g));
    }
    n_rows = ranks ? T : g.n_rows;  /* rows of the expand */
    n_z = per_row ? g.n_rows : T;   /* rows of z and of the shrink */
    st = MOE_STATUS_ALLOC;
    z = moe_alloc((size_t)(n_z * r) + 1, sizeof(float));
    c = moe_alloc((size_t)(n_rows * r) + 1, sizeof(float));
    dc = moe_alloc((size_t)(n_rows * r) + 1, sizeof(float));
    dz = moe_alloc((size_t)(n_z * r) + 1, sizeof(float));
    dyr = ranks ? NULL : moe_alloc((size_t)(n_rows * dout) + 1, sizeof(float));
    if (!z || !c || !dc || !dz || (!ranks && !dyr)) {
        goto done;
    }
    memset(c, 0, sizeof(float) * (size_t)(n_rows * r));
    memset(dz, 0, sizeof(float) * (size_t)(n_z * r));
    if ((st = moe_lora_shrink(p, per_row ? &g : NULL, z)) != MOE_STATUS_OK) {
        goto done;
    }

    /* the expand's inputs c, and dy per expand row */
    for (t = 0; t < T; t++) {
        for (s = 0; s < S; s++) {
            const int32_t e = p->ids[t * S + s];
            const float w = p->weights ? p->weights[t * S + s] : 1.0f;
            const float cw = (ranks ? p->scaling : moe_lora_scale(p, e)) * w;
            if (e < 0) {
                continue;
            }
            if (ranks) {
                c[t * r + e] = cw * z[t * r + e];
                continue;
            }
            {
                const int64_t row = g.position[t * S + s];
                const float *zr = z + (per_row ? row : t) * r;
                for (j = 0; j < r; j++) {
                    c[row * r + j] = cw * zr[j];
                }
                memcpy(dyr + row * dout, b->dy + t * dout,
                       sizeof(float) * (size_t)dout);
            }
        }
    }
    st = moe_lora_linear_backward(c, n_rows, ranks ? NULL : g.offsets,
                                  ranks ? 1 : E, NULL, b->lora_b, r, dout,
                                  ranks ? b->dy : dyr, dc, b->d_lora_b);
    if (st != MOE_STATUS_OK) {
        goto done;
    }

    /* d_weights and dz, slot by slot */
    for (t = 0; t < T; t++) {
        for (s = 0; s < S; s++) {
            const int32_t e = p->ids[t * S + s];
            const float w = p->weights ? p->weights[t * S + s] : 1.0f;
            const float sc = ranks ? p->scaling : (e >= 0 ? moe_lora_scale(p, e) : 0.0f);
            float dw = 0.0f;
            if (e >= 0 && ranks) {
                dw = sc * dc[t * r + e] * z[t * r + e];
                dz[t * r + e] = sc * w * dc[t * r + e];
            }
            else if (e >= 0) {
                const int64_t row = g.position[t * S + s];
                const float *zr = z + (per_row ? row : t) * r;
                float *d = dz + (per_row ? row : t) * r;
                for (j = 0; j < r; j++) {
                    dw += dc[row * r + j] * zr[j];
                    d[j] += sc * w * dc[row * r + j];
                }
                dw *= sc;
            }
            if (b->d_weights != NULL) {
                b->d_weights[t * S + s] = dw;
            }
        }
    }
    if (!need_dz) {
        goto done;
    }

    /* the shrink's backward: dx rows (per slot row or per token), dA */
    if (b->dx != NULL &&
        (dxl = moe_alloc((size_t)(n_z * din) + 1, sizeof(float))) == NULL) {
        st = MOE_STATUS_ALLOC;
        goto done;
    }
    st = moe_lora_linear_backward(p->x, T, per_row ? g.offsets : NULL,
                                  per_row ? E : 1,
                                  per_row ? g.token_index : NULL, b->lora_a,
                                  din, r, dz, dxl, b->d_lora_a);
    if (st != MOE_STATUS_OK || b->dx == NULL) {
        goto done;
    }

    /* dx = dy W0 (the frozen base), then the adapters' rows in slot order */
    if (b->base_w != NULL) {
        moe_linear_backward_params lb;
        memset(&lb, 0, sizeof(lb));
        lb.x = p->x;
        lb.w = b->base_w;
        lb.dtype = b->base_dtype;
        lb.n_tokens = T;
        lb.d_in = din;
        lb.d_out = dout;
        lb.dy = b->dy;
        lb.dx = b->dx;
        if ((st = moe_linear_backward(&lb)) != MOE_STATUS_OK) {
            goto done;
        }
    }
    else {
        memset(b->dx, 0, sizeof(float) * (size_t)(T * din));
    }
    for (t = 0; t < T; t++) {
        float *o = b->dx + t * din;
        for (s = 0; s < (per_row ? S : 1); s++) {
            const int64_t row = per_row ? g.position[t * S + s] : t;
            const float *src = dxl + row * din;
            if (row < 0) {
                continue;
            }
            for (i = 0; i < din; i++) {
                o[i] += src[i];
            }
        }
    }
done:
    moe_lora_rows_free(&g);
    free(z);
    free(c);
    free(dc);
    free(dz);
    free(dyr);
    free(dxl);
    return st;
}
