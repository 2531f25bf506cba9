/* vkpack native kernels: products of many tokens (prefill), y = x @ W^T, on weights as stored.
 * Included once, by kernels.c, after decoders.h and the drivers' TYPE_PARAMS; not a header for anything else.
 *
 * Why not dequantize + BLAS: that writes every weight as f32 to memory and reads it back, and BLAS
 * then packs it again. Here each thread decodes GR rows x KC columns of W into an L1-sized f32 panel
 * (the type's own decoder, as in dequantize) and multiplies it at once into all tokens:
 * x is transposed once per call into token vectors (VL tokens, k-major), and the micro tile keeps
 * GR rows x GT token vectors of f32 accumulators in registers, each step one x load per token vector and
 * one broadcast load per row (no shuffle uops): the FMA ports are the bound. A decoded panel serves
 * every token, so decoding costs 1/n_tok of the FMAs.
 * Numerics: f32 products of the decoded weights (bit-equal to dequantize) and x, summed in k order
 * in f32 for each output: the plain dot product.
 */
#if defined(VKP_AVX512)
#ifndef GR
#define GR 6            /* rows per micro tile */
#define GT 4            /* token vectors per micro tile (GR x GT accumulators + GT + 1 of 32 registers) */
#endif
#else
#define GR 4
#define GT 2            /* 8 + 2 + 1 of 16 registers */
#endif
#ifndef XT_BLOCK
#define XT_BLOCK (1 << 20)   /* bytes of x (transposed) one column block spans at most */
#endif
#ifndef KC_MAX
#define KC_MAX 1024     /* columns per panel at most: GR x KC_MAX floats (24 KiB on AVX-512) stay in L1 */
#endif
#ifndef C_BLOCK
#define C_BLOCK (512 << 10)  /* bytes of accumulators (rows x all tokens) that stay in L2 beside xt's block */
#endif
#define MC_UNIT (16 * GR)    /* their rows come in multiples of this (whole tiles; a multiple of 16: gm_store) */
/* Row strides one cache line past a power of two: panel rows (and token vectors of xt) a multiple of
 * 4 KiB apart would all fall in the same L1 sets, and a tile reads GR (GT) of them at once. */
#define WPS (KC_MAX + 16)
#define XTS(cols) ((cols) * VL + 16)

struct gm_job {
    const uint8_t *w;    /* (rows, row_bytes) stored rows */
    int64_t row_bytes;
    int64_t cols;        /* a multiple of GROUP */
    const float *xt;     /* (n_tv, XTS(cols)) x transposed: token vector v holds tokens v*VL.. (zeros past n_tok) */
    int64_t n_tok, n_tv;
    int64_t kc;          /* columns per panel: a multiple of 256, <= KC_MAX; xt's (n_tv, kc) block stays in L2 */
    int64_t mc;          /* rows whose accumulators stay in L2: a multiple of MC_UNIT, about C_BLOCK bytes */
    float *y;            /* (n_tok, ldy) */
    int64_t ldy;
};

#if defined(VKP_AVX512)
/* r[i][j] -> r[j][i] for a 16 x 16 block of floats: unpack in 128-bit lanes, then move the lanes. */
INLINE void tr16(__m512 r[16]) {
    __m512 t[16], u[16];
    UNROLL for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    UNROLL for (int i = 0; i < 4; i++) {              /* r[4i + c], lane L: column 4L + c, rows 4i.. */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    UNROLL for (int c = 0; c < 4; c++) {
        u[4 * c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
        u[4 * c + 1] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
        u[4 * c + 2] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
        u[4 * c + 3] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    }
    UNROLL for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_f32x4(u[4 * c], u[4 * c + 2], 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(u[4 * c], u[4 * c + 2], 0xDD);
        r[4 + c] = _mm512_shuffle_f32x4(u[4 * c + 1], u[4 * c + 3], 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(u[4 * c + 1], u[4 * c + 3], 0xDD);
    }
}
#endif

/* y[t][r] = c[r][t] for r < nr, t < n_tok: the accumulators (rows, token-major) out to y (tokens,
 * row-major). AVX-512 moves 16 x 16 blocks through tr16, so each store is 16 rows of one token: a
 * store per element, each to another line of y, cost 10-20% of a product (measured, 1 thread). */
INLINE void gm_store(const float *c, int64_t cs, int64_t nr, int64_t n_tok, float *y, int64_t ldy) {
    /* c: (>= nr rounded up to 16, cs) accumulators; y: (n_tok, ldy) from the first row's column */
#if defined(VKP_AVX512)
    for (int64_t r0 = 0; r0 < nr; r0 += 16) {
        const __mmask16 m = nr - r0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nr - r0)) - 1);
        for (int64_t t0 = 0; t0 < n_tok; t0 += 16) {
            __m512 v[16];
            UNROLL for (int i = 0; i < 16; i++) v[i] = _mm512_loadu_ps(c + (r0 + i) * cs + t0);
            tr16(v);
            const int nt = n_tok - t0 < 16 ? (int)(n_tok - t0) : 16;
            for (int i = 0; i < nt; i++) _mm512_mask_storeu_ps(y + (t0 + i) * ldy + r0, m, v[i]);
        }
    }
#else
    for (int64_t r = 0; r < nr; r++)
        for (int64_t t = 0; t < n_tok; t++) y[t * ldy + r] = c[r * cs + t];
#endif
}

/* c[r][v] += sum_k wp[r][k] * xt[v][k] for GR rows and V token vectors, kn columns. */
INLINE void gm_tile(const int V, const float *restrict wp, int64_t kn, const float *restrict xt, int64_t xs,
                    float *restrict c, int64_t cs) {
    /* wp: (GR, WPS) decoded rows; xt: V vectors (kn, VL), xs floats apart; c: (GR, cs) accumulators */
    vf acc[GR][GT];
    UNROLL for (int r = 0; r < GR; r++) UNROLL for (int v = 0; v < V; v++) acc[r][v] = vf_load(c + r * cs + v * VL);
    for (int64_t k = 0; k < kn; k++) {
        vf xv[GT];
        UNROLL for (int v = 0; v < V; v++) xv[v] = vf_load(xt + v * xs + k * VL);
        UNROLL for (int r = 0; r < GR; r++) {
            const vf b = vf_set1(wp[r * WPS + k]);
            UNROLL for (int v = 0; v < V; v++) acc[r][v] = vf_fma(b, xv[v], acc[r][v]);
        }
    }
    UNROLL for (int r = 0; r < GR; r++) UNROLL for (int v = 0; v < V; v++) vf_store(c + r * cs + v * VL, acc[r][v]);
}

/* The stored bytes of the panel after (rg, k0) toward L2, while this one is multiplied: the weights come
 * from DRAM, in runs of GR rows x kc columns too short for the hardware prefetcher (measured, 1 thread,
 * 8192x2048 Q4_K cold at 128 tokens: 95 GFLOP/s without, 122 with the weights in cache). */
INLINE void gm_prefetch_next(const struct gm_job *j, int64_t rg, int64_t rb, int64_t rb1, int64_t r1, int64_t k0,
                             int64_t qk, int64_t bsz) {
    int64_t nrg = rg + GR, nk0 = k0;
    if (nrg >= rb1) {                                      /* the next column block, or the next row block */
        nrg = rb, nk0 = k0 + j->kc;
        if (nk0 >= j->cols) nrg = rb1, nk0 = 0;
    }
    const int64_t b0 = nk0 / qk * bsz, b1 = (nk0 + j->kc < j->cols ? nk0 + j->kc : j->cols) / qk * bsz;
    for (int64_t r = nrg; r < r1 && r < nrg + GR; r++)
        for (int64_t b = b0; b < b1; b += 64) __builtin_prefetch(j->w + r * j->row_bytes + b, 0, 2);
}

/* Rows [r0, r1) of y, mc rows at a time (their accumulators, in c, stay in L2). Loops, outer to inner:
 * a block of kc columns (its part of xt stays in L2 across the mc rows), GR rows (decoded into the
 * panel wp, in L1), GT token vectors (one gm_tile). xt is read from L3 once per mc rows: mc was 96
 * (16 tiles), which at 512 tokens re-read all of x every 96 rows (340 MiB for an 8192x2048 product). */
INLINE void gm_range(TYPE_PARAMS, const struct gm_job *j, int64_t r0, int64_t r1, float *wp, float *c) {
    /* wp: (GR, WPS) panel; c: (mc, n_tv * VL) accumulators */
    (void)UNROLL_K, (void)QK, (void)BSZ, (void)el;
    const int64_t cs = j->n_tv * VL, cols = j->cols;
    for (int64_t rb = r0; rb < r1; rb += j->mc) {
        const int64_t rb1 = r1 - rb < j->mc ? r1 : rb + j->mc;
        memset(c, 0, sizeof(float) * (size_t)(j->mc * cs));
        for (int64_t k0 = 0; k0 < cols; k0 += j->kc) {
            const int64_t kn = cols - k0 < j->kc ? cols - k0 : j->kc;
            for (int64_t rg = rb; rg < rb1; rg += GR) {
                const int nr = rb1 - rg < GR ? (int)(rb1 - rg) : GR;
                if (nr < GR) memset(wp, 0, sizeof(float) * GR * WPS);      /* missing rows multiply as zeros */
                for (int r = 0; r < nr; r++) {
                    const uint8_t *row = j->w + (rg + r) * j->row_bytes;
                    struct kscales ks;
                    for (int64_t g = k0 / GROUP; g < (k0 + kn) / GROUP; g++) {
                        vf wv[GV];
                        if (g % GPB == 0) prep(row, g / GPB, &ks);
                        dec(row, g, &ks, wv);
                        UNROLL for (int v = 0; v < GV; v++) vf_store(wp + r * WPS + g * GROUP - k0 + v * VL, wv[v]);
                    }
                }
                gm_prefetch_next(j, rg, rb, rb1, r1, k0, QK, BSZ);
                float *cr = c + (rg - rb) * cs;
                for (int64_t tv = 0; tv < j->n_tv; tv += GT) {
                    const float *xt = j->xt + tv * XTS(cols) + k0 * VL;
                    switch (j->n_tv - tv < GT ? j->n_tv - tv : GT) {
                        case 1: gm_tile(1, wp, kn, xt, XTS(cols), cr + tv * VL, cs); break;
#if GT > 2
                        case 2: gm_tile(2, wp, kn, xt, XTS(cols), cr + tv * VL, cs); break;
#endif
#if GT > 3
                        case 3: gm_tile(3, wp, kn, xt, XTS(cols), cr + tv * VL, cs); break;
#endif
                        default: gm_tile(GT, wp, kn, xt, XTS(cols), cr + tv * VL, cs); break;
                    }
                }
            }
        }
        gm_store(c, cs, rb1 - rb, j->n_tok, j->y + rb, j->ldy);
    }
}


/* x (n_tok, ldx) into xt: token vector tv at tv * XTS(cols), (cols, VL) k-major; zeros past n_tok. */
static void gm_transpose(const float *x, int64_t ldx, int64_t n_tok, int64_t cols, float *xt, int64_t n_tv, int nth) {
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1 && n_tv > 1)
    for (int64_t tv = 0; tv < n_tv; tv++) {
        float *o = xt + tv * XTS(cols);
#if defined(VKP_AVX512)
        for (int64_t k0 = 0; k0 < cols; k0 += 16) {          /* cols is whole groups */
            __m512 r[16];
            UNROLL for (int i = 0; i < 16; i++) {
                const int64_t t = tv * 16 + i;
                r[i] = t < n_tok ? _mm512_loadu_ps(x + t * ldx + k0) : _mm512_setzero_ps();
            }
            tr16(r);
            UNROLL for (int i = 0; i < 16; i++) _mm512_storeu_ps(o + (k0 + i) * 16, r[i]);
        }
#else
        for (int i = 0; i < VL; i++) {
            const int64_t t = tv * VL + i;
            for (int64_t k = 0; k < cols; k++) o[k * VL + i] = t < n_tok ? x[t * ldx + k] : 0.0f;
        }
#endif
    }
}
