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

moe_status
moe_lora_forward(const moe_lora_params *p)
{
    const int64_t T = p->n_tokens;
    const int32_t r = p->rank, S = p->n_slots;
    const int32_t per_slot = p->kind == MOE_LORA_RANKS ? 1 : r;
    const int32_t *ids = p->select_k > 0 ? p->selected : p->ids;
    int64_t whole[2] = {0, T}, *offsets = NULL, *token_index = NULL;
    int64_t *position = NULL, n_rows = T, t;
    float *z = NULL, *coef = NULL;
    int32_t *index = NULL, s, i;
    moe_linear_params lp;
    moe_lowrank lr;
    moe_experts *zero = NULL;
    moe_status st;

    MOE_TRY(moe_lora_check(p));
    st = MOE_STATUS_ALLOC;
    memset(&lp, 0, sizeof(lp));
    if (p->kind == MOE_LORA_ADAPTERS) {
        moe_dispatch_params dp;
        offsets = moe_alloc((size_t)p->n_adapters + 1, sizeof(int64_t));
        position = moe_alloc((size_t)(T * S), sizeof(int64_t));
        if (!offsets || !position) {
            goto done;
        }
        dp.expert_ids = ids;
        dp.n_tokens = T;
        dp.top_k = S;
        dp.n_experts = p->n_adapters;
        dp.offsets = offsets;
        dp.position = position;
        dp.token_index = NULL;
        if ((st = moe_dispatch_count(&dp)) != MOE_STATUS_OK) {
            goto done;
        }
        n_rows = offsets[p->n_adapters];
        st = MOE_STATUS_ALLOC;
        token_index = moe_alloc((size_t)n_rows, sizeof(int64_t));
        if (token_index == NULL) {
            goto done;
        }
        dp.token_index = token_index;
        if ((st = moe_dispatch_build(&dp)) != MOE_STATUS_OK) {
            goto done;
        }
        st = MOE_STATUS_ALLOC;
    }
    z = moe_alloc((size_t)(n_rows * r), sizeof(float));
    coef = moe_alloc((size_t)(T * S * per_slot), sizeof(float));
    index = moe_alloc((size_t)(T * S * per_slot), sizeof(int32_t));
    if (!z || !coef || !index) {
        goto done;
    }

    /* shrink: z = A x (rows grouped by adapter for ADAPTERS) */
    lp.x = p->x;
    lp.token_index = token_index;
    lp.n_tokens = T;
    lp.offsets = offsets ? offsets : whole;
    lp.n_rows = n_rows;
    lp.weights = p->lora_a;
    lp.out = z;
    if ((st = moe_linear_grouped(&lp)) != MOE_STATUS_OK) {
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
                                           ? position[t * S + s] : t) * r;
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
    free(offsets);
    free(token_index);
    free(position);
    free(z);
    free(coef);
    free(index);
    return st;
}
