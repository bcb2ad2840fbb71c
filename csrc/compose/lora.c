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

/* Whether each token's slots name every adapter exactly once (not RANKS). */
static int
moe_lora_every_adapter(const moe_lora_params *p, const int32_t *ids)
{
    const int32_t S = p->n_slots;
    uint64_t seen;
    int64_t t;
    int32_t s;

    if (p->kind == MOE_LORA_RANKS || S != p->n_adapters || S > 64) {
        return 0;
    }
    for (t = 0; t < p->n_tokens; t++) {
        seen = 0;
        for (s = 0; s < S; s++) {
            const int32_t e = ids[t * S + s];
            if (e < 0 || e >= S || (seen >> e & 1u)) {
                return 0;
            }
            seen |= (uint64_t)1 << e;
        }
    }
    return 1;
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
    int by_adapter;
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
    if (p->save_z != NULL && grouped) { /* per slot, in slot order */
        for (t = 0; t < T * S; t++) {
            const int64_t row = g.position[t];
            for (i = 0; i < r; i++) {
                p->save_z[t * r + i] = row >= 0 ? z[row * r + i] : 0.0f;
            }
        }
    }
    else if (p->save_z != NULL) {
        memcpy(p->save_z, z, sizeof(float) * (size_t)(T * r));
    }

    /* the expand's terms, slot by slot, rank by rank; where every token
     * uses every adapter once (a dense mixture), in adapter order instead,
     * so that all rows share one index row (the GEMM-like update) */
    by_adapter = moe_lora_every_adapter(p, ids);
    for (t = 0; t < T; t++) {
        for (s = 0; s < S; s++) {
            const int32_t e = ids[t * S + s];
            const float w = p->weights ? p->weights[t * S + s] : 1.0f;
            const int64_t at = t * S + (by_adapter ? e : s);
            float *c = coef + at * per_slot;
            int32_t *x = index + at * per_slot;
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

/* Pack fp32 w (n_groups, d_out, d_in) as a linear: as is, or each group
 * transposed to (d_in, d_out); merged: the groups stacked as one linear of
 * n_groups * rows outputs. */
static moe_status
moe_lora_pack(const float *w, int32_t n_groups, int64_t d_out, int64_t d_in,
              int transpose, int merged, moe_experts **out)
{
    const int64_t rows = transpose ? d_in : d_out, cols = transpose ? d_out : d_in;
    moe_linear_pack_params pp;
    float *t = NULL;
    moe_status st;

    if (transpose) {
        if ((t = moe_alloc((size_t)(n_groups * d_out * d_in) + 1,
                           sizeof(float))) == NULL) {
            return MOE_STATUS_ALLOC;
        }
        moe_transpose(w, n_groups, d_out, d_in, t);
    }
    memset(&pp, 0, sizeof(pp));
    pp.w = transpose ? t : w;
    pp.dtype = MOE_DTYPE_F32;
    pp.n_groups = merged ? 1 : n_groups;
    pp.d_in = cols;
    pp.d_out = merged ? n_groups * rows : rows;
    st = moe_linear_pack(&pp, out);
    free(t);
    return st;
}

/* c (m, n) = A^T B over K rows, A (K, m) and B (K, n) row-major fp32. */
static moe_status
moe_lora_wgrad(const float *a, const float *b, int64_t K, int64_t m, int64_t n,
               float *c)
{
    const moe_mm_seg seg = moe_mm_term(a, 1, m, b, n, K);

    return moe_mm(&seg, 1, m, n, c, n);
}

/*
 * The backward's layout.  Dense (RANKS, and every kind while n_adapters <=
 * 2 slots): z = X A_all^T (T, wa) and u = dy B_all (T, wb) over all
 * adapters, each one GEMM of width wa, wb = n * rank (RANKS: rank), and c,
 * dz in the same dense layouts; the weight gradients are then single GEMMs
 * over the tokens.  Sparse (more adapters): z and u only for the routed
 * rows, grouped by adapter, width rank, and the weight gradients per
 * adapter over its rows, x and dy rows picked as they are packed.  The
 * dense layout multiplies zeros (n_adapters / slots times the work); at 4
 * it ran about 1.2x slower than the sparse one, at 2 as fast (TopKLoRA,
 * 1024 x 1024, rank 16, 512 tokens, AMX Xeon).  With finite inputs the
 * zeros add exactly 0 to each chain, so both layouts give the same bits;
 * the choice depends on the sizes alone, never on the batch.
 */
typedef struct moe_lora_bwd {
    const moe_lora_backward_params *b;
    const moe_lora_params *p;
    int            dense, ranks, per_row;
    int64_t        wa, wb;      /* widths of z / dz and of u / c         */
    moe_lora_rows  g;           /* sparse: the rows grouped by adapter    */
} moe_lora_bwd;

/* Offsets into z, u (and c), dz of slot (t, s) of adapter e >= 0, and the
 * values it has (rank, or 1 for RANKS). */
static int32_t
moe_lora_slot(const moe_lora_bwd *w, int64_t t, int32_t s, int32_t e,
              int64_t *zo, int64_t *uo, int64_t *dzo)
{
    const int32_t r = w->p->rank;
    const int64_t row = w->dense ? -1 : w->g.position[t * w->p->n_slots + s];

    if (w->ranks) {
        *zo = *uo = *dzo = t * r + e;
        return 1;
    }
    if (w->dense) {
        *uo = t * w->wb + (int64_t)e * r;
        *zo = *dzo = w->per_row ? t * w->wa + (int64_t)e * r : t * r;
        return r;
    }
    *uo = row * r;
    *zo = *dzo = (w->per_row ? row : t) * r;
    return r;
}

/* dx = W0^T dy + the A^T terms of dz, fused into the transposed base's
 * output tiles (bank [A_0^T | A_1^T | ...]); no base: the terms alone. */
static moe_status
moe_lora_dx(const moe_lora_bwd *w, const float *dz)
{
    const moe_lora_params *p = w->p;
    const int64_t T = p->n_tokens, din = p->d_in;
    const int32_t r = p->rank, S = p->n_slots;
    const int32_t n_a = w->per_row ? p->n_adapters : 1;
    const int32_t per = w->per_row ? S : 1, n_terms = per * r;
    int64_t whole[2] = {0, T}, t, zo, uo, dzo;
    float *coef, *acat;
    int32_t *index, s, j;
    moe_experts *at = NULL, *zero = NULL;
    moe_linear_params lp;
    moe_lowrank lr;
    moe_status st = MOE_STATUS_ALLOC;

    coef = moe_alloc((size_t)(T * n_terms) + 1, sizeof(float));
    index = moe_alloc((size_t)(T * n_terms) + 1, sizeof(int32_t));
    acat = moe_alloc((size_t)(din * n_a * r) + 1, sizeof(float));
    if (!coef || !index || !acat) {
        goto done;
    }
    for (t = 0; t < T; t++) {
        for (s = 0; s < per; s++) {
            const int32_t e = w->per_row ? p->ids[t * S + s] : 0;
            float *cf = coef + (t * per + s) * r;
            int32_t *ix = index + (t * per + s) * r;
            if (w->per_row && e >= 0) {
                moe_lora_slot(w, t, s, e, &zo, &uo, &dzo);
            }
            else {
                dzo = t * r; /* SHARED_A, RANKS: the token's dz row */
            }
            for (j = 0; j < r; j++) {
                cf[j] = e < 0 ? 0.0f : dz[dzo + j];
                ix[j] = e < 0 ? -1 : e * r + j;
            }
        }
    }
    moe_transpose(w->b->lora_a, 1, (int64_t)n_a * r, din, acat);
    if ((st = moe_lora_pack(acat, 1, din, (int64_t)n_a * r, 0, 0, &at)) !=
        MOE_STATUS_OK) {
        goto done;
    }
    lr.coef = coef;
    lr.index = index;
    lr.n_terms = n_terms;
    lr.bank = at;
    memset(&lp, 0, sizeof(lp));
    lp.x = w->b->dy;
    lp.n_tokens = T;
    lp.offsets = whole;
    lp.n_rows = T;
    lp.weights = w->b->base_t;
    lp.lowrank = &lr;
    lp.out = w->b->dx;
    if (w->b->base_t == NULL) { /* the update alone: a base without inputs */
        moe_linear_pack_params zp;
        memset(&zp, 0, sizeof(zp));
        zp.w = w->b->dy;
        zp.dtype = MOE_DTYPE_F32;
        zp.n_groups = 1;
        zp.d_out = din;
        if ((st = moe_linear_pack(&zp, &zero)) != MOE_STATUS_OK) {
            goto done;
        }
        lp.x = NULL;
        lp.weights = zero;
    }
    st = moe_linear_grouped(&lp);
done:
    moe_experts_free(at);
    moe_experts_free(zero);
    free(coef);
    free(index);
    free(acat);
    return st;
}

/* u = B^T dy: dense, dy against [B_0 | B_1 | ...] (d_out, wb) over every
 * token; sparse, adapter by adapter over its rows (dy's rows picked as
 * they are packed).  B is read in place: nothing to pack. */
static moe_status
moe_lora_u(const moe_lora_bwd *w, float *u)
{
    const moe_lora_params *p = w->p;
    const float *lb = w->b->lora_b, *dy = w->b->dy;
    const int64_t T = p->n_tokens, dout = p->d_out;
    const int32_t r = p->rank, E = p->n_adapters;
    moe_mm_seg *segs;
    moe_mm_prob *probs;
    moe_status st;
    float *cat;
    int64_t o;
    int32_t e;

    if (w->dense && w->ranks) {
        const moe_mm_seg seg = moe_mm_term(dy, dout, 1, lb, r, dout);
        return moe_mm(&seg, 1, T, r, u, r);
    }
    if (w->dense) {
        moe_mm_seg seg;
        if ((cat = moe_alloc((size_t)(dout * w->wb) + 1, sizeof(float))) == NULL) {
            return MOE_STATUS_ALLOC;
        }
        for (o = 0; o < dout; o++) {
            for (e = 0; e < E; e++) {
                memcpy(cat + o * w->wb + (int64_t)e * r, lb + (e * dout + o) * r,
                       sizeof(float) * (size_t)r);
            }
        }
        seg = moe_mm_term(dy, dout, 1, cat, w->wb, dout);
        st = moe_mm(&seg, 1, T, w->wb, u, w->wb);
        free(cat);
        return st;
    }
    segs = moe_alloc((size_t)E, sizeof(*segs));
    probs = moe_alloc((size_t)E, sizeof(*probs));
    if (segs == NULL || probs == NULL) {
        free(segs);
        free(probs);
        return MOE_STATUS_ALLOC;
    }
    for (e = 0; e < E; e++) {
        const int64_t r0 = w->g.offsets[e];
        segs[e] = moe_mm_term(dy, dout, 1, lb + e * dout * r, r, dout);
        segs[e].a_rows = w->g.token_index + r0;
        probs[e] = (moe_mm_prob){&segs[e], 1, w->g.offsets[e + 1] - r0, r,
                                 u + r0 * r, r};
    }
    st = moe_mm_many(probs, E);
    free(segs);
    free(probs);
    return st;
}

/* Dense: dB = dy^T c, one GEMM (d_out, wb) split into the adapters' (d_out,
 * r), and dA = dz^T x, one GEMM (wa, d_in). */
static moe_status
moe_lora_dense_wgrads(const moe_lora_bwd *w, const float *c, const float *dz)
{
    const moe_lora_backward_params *b = w->b;
    const moe_lora_params *p = w->p;
    const int64_t T = p->n_tokens, dout = p->d_out;
    const int32_t r = p->rank, E = p->n_adapters;
    moe_status st = MOE_STATUS_OK;
    float *all;
    int64_t i;
    int32_t e;

    if (b->d_lora_b != NULL && w->ranks) {
        st = moe_lora_wgrad(b->dy, c, T, dout, r, b->d_lora_b);
    }
    else if (b->d_lora_b != NULL) {
        if ((all = moe_alloc((size_t)(dout * w->wb) + 1, sizeof(float))) == NULL) {
            return MOE_STATUS_ALLOC;
        }
        st = moe_lora_wgrad(b->dy, c, T, dout, w->wb, all);
        for (e = 0; e < E && st == MOE_STATUS_OK; e++) {
            for (i = 0; i < dout; i++) {
                memcpy(b->d_lora_b + (e * dout + i) * r, all + i * w->wb + e * r,
                       sizeof(float) * (size_t)r);
            }
        }
        free(all);
    }
    if (st == MOE_STATUS_OK && b->d_lora_a != NULL) {
        st = moe_lora_wgrad(dz, p->x, T, w->wa, p->d_in, b->d_lora_a);
    }
    return st;
}

/* Sparse: per adapter over its rows, in one pool job, dB_e^T = c_e^T dy_e
 * (transposed into dB_e after) and dA_e = dz_e^T x_e (x's and dy's rows
 * picked as they are packed); SHARED_A's one A: dA = dz^T x over the
 * tokens. */
static moe_status
moe_lora_sparse_wgrads(const moe_lora_bwd *w, const float *c, const float *dz)
{
    const moe_lora_backward_params *b = w->b;
    const moe_lora_params *p = w->p;
    const int64_t dout = p->d_out, din = p->d_in;
    const int32_t r = p->rank, E = p->n_adapters;
    const int dA = b->d_lora_a != NULL && w->per_row, dB = b->d_lora_b != NULL;
    moe_mm_seg *segs;
    moe_mm_prob *probs;
    float *bt = NULL;
    moe_status st = MOE_STATUS_ALLOC;
    int n = 0;
    int32_t e;

    segs = moe_alloc((size_t)(2 * E), sizeof(*segs));
    probs = moe_alloc((size_t)(2 * E), sizeof(*probs));
    if (dB) {
        bt = moe_alloc((size_t)(E * r * dout) + 1, sizeof(float));
    }
    if (segs == NULL || probs == NULL || (dB && bt == NULL)) {
        goto done;
    }
    for (e = 0; e < E; e++) {
        const int64_t r0 = w->g.offsets[e], m = w->g.offsets[e + 1] - r0;
        if (dB) {
            segs[n] = moe_mm_term(c + r0 * r, 1, r, b->dy, dout, m);
            segs[n].b_rows = w->g.token_index + r0;
            probs[n] = (moe_mm_prob){&segs[n], 1, r, dout, bt + e * r * dout,
                                     dout};
            n++;
        }
        if (dA) {
            segs[n] = moe_mm_term(dz + r0 * r, 1, r, p->x, din, m);
            segs[n].b_rows = w->g.token_index + r0;
            probs[n] = (moe_mm_prob){&segs[n], 1, r, din,
                                     b->d_lora_a + e * r * din, din};
            n++;
        }
    }
    st = moe_mm_many(probs, n);
    if (st == MOE_STATUS_OK && dB) {
        moe_transpose(bt, E, r, dout, b->d_lora_b);
    }
    if (st == MOE_STATUS_OK && b->d_lora_a != NULL && !w->per_row) {
        st = moe_lora_wgrad(dz, p->x, p->n_tokens, w->wa, din, b->d_lora_a);
    }
done:
    free(segs);
    free(probs);
    free(bt);
    return st;
}

/*
 * Per slot (t, s) of adapter e, with z = A_e x_t recomputed and
 * c = scale_e * w:  u = B_e^T dy_t,  d_w = scale_e <u, z>,  dz = c u,
 * dB_e = sum dy_t (c z)^T,  dA_e = sum dz x_t^T,
 * dx_t = W0^T dy_t + sum_s A_e^T dz.
 */
moe_status
moe_lora_backward(const moe_lora_backward_params *b)
{
    const moe_lora_params *p = b->forward;
    int64_t whole[2] = {0, 0}, T, din, dout, n_u, n_z, t, zo, uo, dzo;
    int32_t r, S, E, n_a, s, j, n;
    moe_lora_bwd w;
    float *z = NULL, *c = NULL, *u = NULL, *dz = NULL;
    moe_experts *at = NULL;
    moe_linear_params lp;
    moe_status st;

    if (p == NULL || b->dy == NULL || b->lora_a == NULL || b->lora_b == NULL ||
        p->select_k != 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "LoRA backward: needs "
                             "the forward's params (select_k 0: its selected "
                             "ranks as ids), dy, lora_a and lora_b");
    }
    MOE_TRY(moe_lora_check(p));
    T = whole[1] = p->n_tokens;
    din = p->d_in;
    dout = p->d_out;
    r = p->rank;
    S = p->n_slots;
    E = p->n_adapters;
    if (b->base_t != NULL) {
        moe_experts_info bi;
        moe_experts_get_info(b->base_t, &bi);
        if (!bi.linear || bi.n_experts != 1 || bi.d_model != din ||
            bi.d_ff != dout) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "base_t must be a "
                                 "packed linear of shape (1, d_in=%lld, "
                                 "d_out=%lld)", (long long)din,
                                 (long long)dout);
        }
    }
    memset(&w, 0, sizeof(w));
    w.b = b;
    w.p = p;
    w.ranks = p->kind == MOE_LORA_RANKS;
    w.per_row = p->kind == MOE_LORA_ADAPTERS;
    w.dense = w.ranks || (int64_t)E <= 2 * (int64_t)S;
    n_a = w.per_row ? E : 1;
    w.wa = (int64_t)n_a * r;
    w.wb = w.ranks ? r : (int64_t)E * r;
    if (!w.dense) {
        MOE_TRY(moe_lora_group(p, p->ids, &w.g));
    }
    n_u = w.dense ? T * w.wb : w.g.n_rows * r;
    n_z = w.dense ? T * w.wa : (w.per_row ? w.g.n_rows : T) * r;
    st = MOE_STATUS_ALLOC;
    z = moe_alloc((size_t)n_z + 1, sizeof(float));
    dz = moe_alloc((size_t)n_z + 1, sizeof(float));
    u = moe_alloc((size_t)n_u + 1, sizeof(float));
    c = moe_alloc((size_t)n_u + 1, sizeof(float));
    if (!z || !c || !u || !dz) {
        goto done;
    }
    memset(c, 0, sizeof(float) * (size_t)n_u);
    memset(dz, 0, sizeof(float) * (size_t)n_z);

    /* z = A x: the forward's (saved), or dense over all adapters (A_all
     * (wa, d_in)), or per routed row / per token (the forward's pack) */
    if (b->z != NULL && w.per_row) { /* only the selected entries are read */
        for (t = 0; t < T; t++) {
            for (s = 0; s < S; s++) {
                const int32_t e = p->ids[t * S + s];
                if (e >= 0) {
                    moe_lora_slot(&w, t, s, e, &zo, &uo, &dzo);
                    memcpy(z + zo, b->z + (t * S + s) * r, sizeof(float) * (size_t)r);
                }
            }
        }
        st = MOE_STATUS_OK;
    }
    else if (b->z != NULL) {
        memcpy(z, b->z, sizeof(float) * (size_t)(T * r));
        st = MOE_STATUS_OK;
    }
    else if (w.dense && w.per_row) {
        if ((st = moe_lora_pack(b->lora_a, 1, w.wa, din, 0, 0, &at)) !=
            MOE_STATUS_OK) {
            goto done;
        }
        memset(&lp, 0, sizeof(lp));
        lp.x = p->x;
        lp.n_tokens = T;
        lp.offsets = whole;
        lp.n_rows = T;
        lp.weights = at;
        lp.out = z;
        st = moe_linear_grouped(&lp);
    }
    else {
        st = moe_lora_shrink(p, w.per_row && !w.dense ? &w.g : NULL, z);
    }
    if (st != MOE_STATUS_OK) {
        goto done;
    }

    if ((st = moe_lora_u(&w, u)) != MOE_STATUS_OK) {
        goto done;
    }

    /* c, d_weights and dz, slot by slot (in slot order) */
    for (t = 0; t < T; t++) {
        for (s = 0; s < S; s++) {
            const int32_t e = p->ids[t * S + s];
            const float wt = p->weights ? p->weights[t * S + s] : 1.0f;
            float dw = 0.0f, sc;
            if (e >= 0) {
                sc = w.ranks ? p->scaling : moe_lora_scale(p, e);
                n = moe_lora_slot(&w, t, s, e, &zo, &uo, &dzo);
                for (j = 0; j < n; j++) {
                    c[uo + j] += sc * wt * z[zo + j];
                    dw += u[uo + j] * z[zo + j];
                    dz[dzo + j] += sc * wt * u[uo + j];
                }
                dw *= sc;
            }
            if (b->d_weights != NULL) {
                b->d_weights[t * S + s] = dw;
            }
        }
    }

    /* dB = dy^T c and dA = dz^T x: single GEMMs over the tokens (dense),
     * or per adapter over its rows (sparse) */
    if (w.dense) {
        st = moe_lora_dense_wgrads(&w, c, dz);
    }
    else if (b->d_lora_a != NULL || b->d_lora_b != NULL) {
        st = moe_lora_sparse_wgrads(&w, c, dz);
    }
    if (st == MOE_STATUS_OK && b->dx != NULL) {
        st = moe_lora_dx(&w, dz);
    }
done:
    moe_lora_rows_free(&w.g);
    moe_experts_free(at);
    free(z);
    free(c);
    free(u);
    free(dz);
    return st;
}
