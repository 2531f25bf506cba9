/* vkpack native kernels: several experts of a mixture, a few rows each, in one parallel region.
 * Included once, by kernels.c, after the per-type products; not a header for anything else.
 *
 * Why: in a decode step the hybrid backend gives the CPU a handful of experts a layer (runtime/hybrid/
 * experts.py), each three products of ~1 MB. One vkp_matmul per product starts the threads 3n times
 * and returns to Python between them: ~8 us each on the 2-core VM, as long as a product's reads on a
 * 16-core server. Here every expert's gate and up products share one pass of the threads, SwiGLU and
 * the down products the next, and the routing-weighted sum the last, with barriers in between.
 * Numerics: each product as vkp_matmul computes it for the same rows (the same row kernels); SwiGLU as
 * the numpy reference writes it (g / (1 + exp(-g)) * u, g clipped to +-80 inside the exp); the sum
 * over experts in the order given, each row's term weight * y, as the numpy backend adds them.
 */
struct vkp_expert {
    int32_t type[3];          /* GGML type ids of gate, up, down */
    const uint8_t *w[3];      /* their stored rows: gate and up (ffn, row_bytes), down (width, row_bytes) */
    int64_t row_bytes[3];
    int64_t n_rows;           /* rows of x that chose this expert */
    const int32_t *rows;      /* (n_rows,) their indices in x */
    const float *weight;      /* (n_rows,) their routing weights */
};

#define XP_CHUNK 64           /* rows of a product per work item */

/* One product of the call: its rows in [r0, r1) for the expert's n rows. */
struct xp_prod {
    const struct type_info *ti;
#if defined(VKP_AVX512)
    const struct fast_info *fi;
    float *p;                 /* prepared activations (fast path), or 0 */
    int64_t ldp, nb;
#endif
    const uint8_t *w;
    int64_t row_bytes, rows, cols;
    const float *x;           /* (n, cols) */
    int64_t n;
    float *y;                 /* (n, ldy) */
    int64_t ldy;
};

static void xp_prepare(struct xp_prod *q) {
#if defined(VKP_AVX512)
    if (q->fi && q->p)
        for (int64_t t = 0; t < q->n; t++) q->fi->px(q->x + t * q->cols, q->nb, q->p + t * q->ldp);
#else
    (void)q;
#endif
}

static void xp_rows(const struct xp_prod *q, int64_t r0, int64_t r1) {
#if defined(VKP_AVX512)
    if (q->fi) {
        const struct px_job j = {q->w, q->row_bytes, q->nb, q->x, q->cols, q->p ? q->p : q->x, q->ldp, q->n, q->y, q->ldy};
        q->fi->mm(&j, r0, r1);
        return;
    }
#endif
    const struct mm_job j = {q->w, q->row_bytes, q->cols, q->x, q->cols, q->n, q->y, q->ldy};
    q->ti->mm(&j, r0, r1);
}

/* Fills q for rows x cols of type `type`; 0 when the type or the row length is not valid. */
static int xp_init(struct xp_prod *q, int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols,
                   const float *x, int64_t n, float *y, int64_t ldy, float **pbuf) {
    q->ti = check(type, row_bytes, rows, cols);
    if (!q->ti) return 0;
    q->w = w, q->row_bytes = row_bytes, q->rows = rows, q->cols = cols, q->x = x, q->n = n, q->y = y, q->ldy = ldy;
#if defined(VKP_AVX512)
    q->fi = fast_info(type);
    if (q->fi && n > q->fi->max_tok) q->fi = 0;
    q->nb = q->fi ? cols / q->ti->qk : 0;
    q->ldp = q->fi ? q->fi->ldp(q->nb) : 0;
    q->p = 0;
    if (q->ldp) {
        q->p = *pbuf;
        *pbuf += n * q->ldp;
    }
#else
    (void)pbuf;
#endif
    return 1;
}

static int64_t xp_pfloats(int type, int64_t cols, int64_t n) {
#if defined(VKP_AVX512)
    const struct fast_info *fi = fast_info(type);
    const struct type_info *ti = type_info(type);
    if (!fi || !ti || n > fi->max_tok || cols % ti->qk) return 0;
    return n * fi->ldp(cols / ti->qk);
#else
    (void)type, (void)cols, (void)n;
    return 0;
#endif
}

/* Items of a phase: (product, first row) for every XP_CHUNK rows of each product. */
static int64_t xp_items(const struct xp_prod *q, int nq, int64_t *item) {
    int64_t k = 0;
    for (int i = 0; i < nq; i++)
        for (int64_t r = 0; r < q[i].rows; r += XP_CHUNK) item[2 * k] = i, item[2 * k + 1] = r, k++;
    return k;
}

int vkp_experts(int n_exp, const struct vkp_expert *ex, int64_t ffn, int64_t width, const float *x, int64_t n_tok,
                float *out, int n_threads) {
    /* x: (n_tok, width) the op's input rows; out: (n_tok, width), overwritten with the weighted sum */
    if (n_exp < 0 || ffn <= 0 || width <= 0 || n_tok < 0) return -1;
    int64_t rows_all = 0, pfl = 0, items_max = 0;
    for (int e = 0; e < n_exp; e++) {
        const int64_t m = ex[e].n_rows;
        if (m < 0 || m > n_tok) return -1;
        for (int64_t i = 0; i < m; i++)
            if (ex[e].rows[i] < 0 || ex[e].rows[i] >= n_tok) return -1;
        if (!check(ex[e].type[0], ex[e].row_bytes[0], ffn, width) || !check(ex[e].type[1], ex[e].row_bytes[1], ffn, width) ||
            !check(ex[e].type[2], ex[e].row_bytes[2], width, ffn))
            return -1;
        rows_all += m;
        pfl += xp_pfloats(ex[e].type[0], width, m) + xp_pfloats(ex[e].type[1], width, m) + xp_pfloats(ex[e].type[2], ffn, m);
        items_max += 2 * ((ffn + XP_CHUNK - 1) / XP_CHUNK) + (width + XP_CHUNK - 1) / XP_CHUNK;
    }
    /* scratch: gathered x (rows_all, width), g and u (rows_all, ffn) each, y (rows_all, width), prepared x */
    const size_t floats = (size_t)(rows_all * (2 * width + 2 * ffn) + pfl) + 16;
    float *buf = aligned_alloc(64, (floats * 4 + 63) / 64 * 64);
    struct xp_prod *q = malloc(sizeof(struct xp_prod) * (size_t)(3 * n_exp + 1));
    int64_t *item = malloc(sizeof(int64_t) * (size_t)(2 * items_max + 2));
    if (!buf || !q || !item) {
        free(buf), free(q), free(item);
        return -3;
    }
    float *xg = buf, *g = xg + rows_all * width, *u = g + rows_all * ffn, *y = u + rows_all * ffn, *pb = y + rows_all * width;
    int64_t at = 0;
    for (int e = 0; e < n_exp; e++) {   /* products 0..2n-1: gate, up of each; 2n..3n-1: down */
        const int64_t m = ex[e].n_rows;
        xp_init(&q[2 * e], ex[e].type[0], ex[e].w[0], ex[e].row_bytes[0], ffn, width, xg + at * width, m, g + at * ffn, ffn, &pb);
        xp_init(&q[2 * e + 1], ex[e].type[1], ex[e].w[1], ex[e].row_bytes[1], ffn, width, xg + at * width, m, u + at * ffn, ffn, &pb);
        xp_init(&q[2 * n_exp + e], ex[e].type[2], ex[e].w[2], ex[e].row_bytes[2], width, ffn, g + at * ffn, m, y + at * width,
                width, &pb);
        at += m;
    }
    const int64_t n_gu = xp_items(q, 2 * n_exp, item);
    const int64_t n_dn = xp_items(q + 2 * n_exp, n_exp, item + 2 * n_gu);
    int nth = n_threads < 1 ? 1 : n_threads;
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
#pragma omp for schedule(static)
        for (int e = 0; e < n_exp; e++) {   /* gather each expert's rows, prepare them for its gate and up */
            float *dst = (float *)q[2 * e].x;
            for (int64_t i = 0; i < ex[e].n_rows; i++) memcpy(dst + i * width, x + (int64_t)ex[e].rows[i] * width, 4 * width);
            xp_prepare(&q[2 * e]);
            xp_prepare(&q[2 * e + 1]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < n_gu; k++) {
            const struct xp_prod *p = &q[item[2 * k]];
            const int64_t r0 = item[2 * k + 1];
            xp_rows(p, r0, r0 + XP_CHUNK < p->rows ? r0 + XP_CHUNK : p->rows);
        }
#pragma omp for schedule(static)
        for (int e = 0; e < n_exp; e++) {   /* g = silu(g) * u, then prepared for the down product */
            struct xp_prod *d = &q[2 * n_exp + e];
            float *gg = (float *)d->x;
            const float *uu = q[2 * e + 1].y;
            for (int64_t i = 0; i < ex[e].n_rows * ffn; i++) {
                float c = -gg[i];
                c = c < -80.0f ? -80.0f : c > 80.0f ? 80.0f : c;
                gg[i] = gg[i] / (expf(c) + 1.0f) * uu[i];
            }
            xp_prepare(d);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < n_dn; k++) {
            const struct xp_prod *p = &q[2 * n_exp + item[2 * (n_gu + k)]];
            const int64_t r0 = item[2 * (n_gu + k) + 1];
            xp_rows(p, r0, r0 + XP_CHUNK < p->rows ? r0 + XP_CHUNK : p->rows);
        }
#pragma omp for schedule(static)
        for (int64_t c0 = 0; c0 < width; c0 += 64) {   /* out = sum over experts, in order, of weight * y */
            const int64_t c1 = c0 + 64 < width ? c0 + 64 : width;
            for (int64_t t = 0; t < n_tok; t++) memset(out + t * width + c0, 0, 4 * (c1 - c0));
            for (int e = 0; e < n_exp; e++) {
                const float *ye = q[2 * n_exp + e].y;
                for (int64_t i = 0; i < ex[e].n_rows; i++) {
                    float *o = out + (int64_t)ex[e].rows[i] * width;
                    const float wt = ex[e].weight[i];
                    for (int64_t c = c0; c < c1; c++) o[c] += ye[i * width + c] * wt;
                }
            }
        }
    }
    free(buf), free(q), free(item);
    return 0;
}
