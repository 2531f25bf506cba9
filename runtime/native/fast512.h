/* vkpack native kernels: AVX-512 products of a few tokens (decode) on prepared activations.
 * Included once, by kernels.c, under VKP_AVX512, after decoders.h; not a header for anything else.
 *
 * Why: the generic drivers decode each group into floats and were bound by that decoding (2-3.5
 * elements per cycle for 4-bit types, a quarter of the memory's speed). Here each type's row kernel
 * does the least vector work per element, helped by a form of x prepared once per call and shared by
 * every row (`px_<type>`: one token's x reordered and/or with sums of its sub-blocks):
 * - offsets come out of the loop: dot(d*q + m, x) = d*dot(q, x) + m*sum(x), with sum(x) per sub-block
 *   from the prepared x (Q4_0's -8, Q4_1's m, Q4_K's mins);
 * - a 4-bit value becomes a float with one vpermps over the table 0..15, and Q4_K reads its nibbles
 *   straight from 64-byte loads (each dword lane's byte k, shifted down), x being reordered to match;
 * - small-block scales (stride 18-34 bytes) are gathered 16 at a time and converted at once.
 * Numerics: f32 activations, f32 accumulation, no activation quantization; only the order of the sums
 * differs from the generic path (tests/test_native_kernels.py bounds the error the same way).
 * A row is decoded once per FT tokens; the rows are outer so a row stays in L1 for all tokens.
 */
#define FT 4                      /* tokens per row pass */
#ifndef XPF
#define XPF 3072   /* software prefetch distance, bytes (measured, 1 and 2 threads: +20-40% over 640 from DRAM) */
#endif
/* Makes the compiler store a local array and load it back: a broadcast or widening load from memory
 * costs no shuffle-port uop, the register forms GCC would otherwise pick (vpermd, vextracti32x4) do. */
#define SPILLED(a) __asm__ volatile("" : : "r"(a) : "memory")

/* Prepared x of one token: `values` floats (the kernel's order; 0 when x is read as it is), then the
 * sums area. px_<type>(x, nb, p) writes it; the row kernels read it. */
struct px_job {
    const uint8_t *w;    /* (rows, row_bytes) stored rows */
    int64_t row_bytes;
    int64_t nb;          /* blocks per row */
    const float *x;      /* (n_tok, ldx) the activations as given */
    int64_t ldx;
    const float *p;      /* (n_tok, ldp) prepared activations */
    int64_t ldp;
    int64_t n_tok;
    float *y;            /* (n_tok, ldy) */
    int64_t ldy;
};

INLINE __m512 iota16(void) { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

/* The f16 at byte `off` of each of 16 blocks `stride` bytes apart (fewer when n < 16), as floats. */
INLINE __m512 gather_f16(const uint8_t *b, int stride, int off, int n) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(stride));
    const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, (const void *)(b + off), 1);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
}

/* The two f16 at bytes off, off+2 of 16 blocks: *lo, *hi (Q4_1's d and m). */
INLINE void gather_f16x2(const uint8_t *b, int stride, int off, int n, __m512 *lo, __m512 *hi) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(stride));
    const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, (const void *)(b + off), 1);
    *lo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
    *hi = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
}

/* ---- small blocks (32 elements): x as it is, then the block sums (times a constant), 16-padded ---- */
#define SUMS_PAD(nb) (((nb) + 15) / 16 * 16)

/* p = [sum of block b of x, times k]; the kernel reads x itself. */
static void px_sums32(const float *x, int64_t nb, float k, float *p) {
    for (int64_t b = 0; b < nb; b++) {
        __m512 s = _mm512_add_ps(_mm512_loadu_ps(x + 32 * b), _mm512_loadu_ps(x + 32 * b + 16));
        p[b] = k * _mm512_reduce_add_ps(s);
    }
    for (int64_t b = nb; b < SUMS_PAD(nb); b++) p[b] = 0.0f;
}
static void px_q4_0(const float *x, int64_t nb, float *p) { px_sums32(x, nb, -8.0f, p); }
static void px_q4_1(const float *x, int64_t nb, float *p) { px_sums32(x, nb, 1.0f, p); }
static void px_none(const float *x, int64_t nb, float *p) { (void)x, (void)nb, (void)p; }

/* One block i of a 16-block run (SMALL_ROW): q (2 x 16 floats) times x, summed, times the block's d,
 * into accumulator A of each token. */
#define SMALL_BLOCK(i, A, BSZ, DECODE)                                                                        \
    do {                                                                                                     \
        const uint8_t *b = blk + BSZ * (i);                                                                  \
        __builtin_prefetch(b + XPF);                                                                         \
        __m512 q0, q1;                                                                                       \
        DECODE;                                                                                              \
        const __m512 dv = _mm512_set1_ps(ds[i]);                                                             \
        const float *xb = x + 32 * (b0 + (i));                                                               \
        UNROLL for (int t = 0; t < NT; t++) {                                                                \
            __m512 s = _mm512_mul_ps(q0, _mm512_loadu_ps(xb + t * ldx));                                     \
            s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + t * ldx + 16), s);                                  \
            tot[t][A] = _mm512_fmadd_ps(s, dv, tot[t][A]);                                                   \
        }                                                                                                    \
    } while (0)

/* One row of 32-element blocks (BSZ bytes, f16 d first) against NT tokens. d (and Q4_1's m) of 16
 * blocks are gathered at once; OFF: 0 no offset, 1 d * the sums area (Q4_0: -8 sum x), 2 m * it. */
#define SMALL_ROW(NAME, BSZ, OFF, DECODE)                                                                     \
    INLINE void xr_##NAME(const uint8_t *restrict row, int64_t nb, const float *restrict x, int64_t ldx,     \
                          const float *restrict p, int64_t ldp, const int NT, float *out) {                  \
        const int NA = NT == 1 ? 2 : 1;                                                                      \
        __m512 tot[FT][2], tof[FT];                                                                          \
        UNROLL for (int t = 0; t < NT; t++) tot[t][0] = tot[t][1] = tof[t] = _mm512_setzero_ps();            \
        const __m512 tbl = iota16();                                                                         \
        (void)tbl;                                                                                           \
        for (int64_t b0 = 0; b0 < nb; b0 += 16) {                                                            \
            const int n = nb - b0 < 16 ? (int)(nb - b0) : 16;                                                \
            const uint8_t *blk = row + BSZ * b0;                                                             \
            __m512 d16, m16;                                                                                 \
            if (OFF == 2) gather_f16x2(blk, BSZ, 0, n, &d16, &m16);                                          \
            else d16 = m16 = gather_f16(blk, BSZ, 0, n);                                                     \
            UNROLL for (int t = 0; t < NT; t++)                                                              \
                if (OFF) tof[t] = _mm512_fmadd_ps(m16, _mm512_loadu_ps(p + t * ldp + b0), tof[t]);          \
            float ds[16];                                                                                    \
            _mm512_storeu_ps(ds, d16);                                                                       \
            SPILLED(ds);                                                                                     \
            if (n == 16) {                                                                                   \
                UNROLL for (int i = 0; i < 16; i++) SMALL_BLOCK(i, i % NA, BSZ, DECODE);                     \
            } else {                                                                                         \
                for (int i = 0; i < n; i++) SMALL_BLOCK(i, 0, BSZ, DECODE);                                  \
            }                                                                                                \
        }                                                                                                    \
        UNROLL for (int t = 0; t < NT; t++)                                                                  \
            out[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(tot[t][0], tot[t][1]), tof[t]));       \
    }

/* q = the 32 nibbles (low ones first) of the 16 bytes at qs, as floats. */
#define NIB32(qs)                                                                                                \
    do {                                                                                                         \
        const __m512i qi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs)));                         \
        q0 = _mm512_permutexvar_ps(qi, tbl);                                                                     \
        q1 = _mm512_permutexvar_ps(_mm512_srli_epi32(qi, 4), tbl);                                               \
    } while (0)

SMALL_ROW(q4_0, 18, 1, NIB32(b + 2))
SMALL_ROW(q4_1, 20, 2, NIB32(b + 4))
SMALL_ROW(q8_0, 34, 0,
          q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2))));
          q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18)))))

/* ---- Q4_K: x reordered to the nibbles' order in 64-byte loads, then [0 x 8, -sum of each sub-block] ----
 * A block's qs[128] is two 64-byte chunks c; dword lane i of chunk c holds bytes 4i..4i+3, whose low
 * (nib 0) or high (nib 1) nibble of byte k is element 128c + 64(i >> 3) + 4(i & 7) + k + 32 nib, of
 * sub-block s = 4c + 2(i >> 3) + nib. Prepared block: 256 values [c][nib][k][i], then 16 sums. */
#define PXB_Q4_K 272

static void px_q4_k(const float *x, int64_t nb, float *p) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 256 * b;
        float *pb = p + PXB_Q4_K * b;
        for (int c = 0; c < 2; c++)
            for (int nib = 0; nib < 2; nib++)
                for (int k = 0; k < 4; k++)
                    for (int i = 0; i < 16; i++)
                        pb[((c * 2 + nib) * 4 + k) * 16 + i] = xb[128 * c + 64 * (i >> 3) + 4 * (i & 7) + k + 32 * nib];
        for (int s = 0; s < 8; s++) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(xb + 32 * s), _mm512_loadu_ps(xb + 32 * s + 16));
            pb[256 + s] = 0.0f;
            pb[264 + s] = -_mm512_reduce_add_ps(v);
        }
    }
}

/* The 8 six-bit scales (bytes 0-7) and mins (bytes 8-15) of a Q4_K/Q5_K block's 12 scale bytes, as
 * floats times d (lanes 0-7) and dmin (lanes 8-15): ggml's get_scale_min_k4, 4 bytes at a time. */
INLINE __m512 k4_scales(const uint8_t *b) {
    uint32_t u[3];
    memcpy(u, b + 4, 12);
    const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    const uint64_t sc = (uint64_t)(u[0] & m6) | (uint64_t)((u[2] & m4) | (((u[0] >> 6) & m2) << 4)) << 32;
    const uint64_t mn = (uint64_t)(u[1] & m6) | (uint64_t)(((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4)) << 32;
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x((long long)mn, (long long)sc)));
    const __m512 dd = _mm512_cvtph_ps(_mm256_set1_epi32((int)rd32(b)));          /* d, dmin, d, dmin, ... */
    const __m512 dm = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), dd);
    return _mm512_mul_ps(f, dm);
}

INLINE void xr_q4_k(const uint8_t *restrict row, int64_t nb, const float *restrict x, int64_t ldx,
                    const float *restrict p, int64_t ldp, const int NT, float *out) {
    (void)x, (void)ldx;
    __m512 tot[FT];
    UNROLL for (int t = 0; t < NT; t++) tot[t] = _mm512_setzero_ps();
    const __m512 tbl = iota16();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + 144 * b;
        const float *pb = p + PXB_Q4_K * b;
        __builtin_prefetch(blk + XPF);
        __builtin_prefetch(blk + XPF + 64);
        __builtin_prefetch(blk + XPF + 128);
        const __m512 ab = k4_scales(blk);                            /* d*sc[0..7], dmin*m[0..7] */
        UNROLL for (int t = 0; t < NT; t++) tot[t] = _mm512_fmadd_ps(ab, _mm512_loadu_ps(pb + t * ldp + 256), tot[t]);
        UNROLL for (int c = 0; c < 2; c++) {
            const __m512i raw = _mm512_loadu_si512((const void *)(blk + 16 + 64 * c));
            UNROLL for (int nib = 0; nib < 2; nib++) {
                __m512 v[4];
                UNROLL for (int k = 0; k < 4; k++)
                    v[k] = _mm512_permutexvar_ps(k + nib ? _mm512_srli_epi32(raw, 8 * k + 4 * nib) : raw, tbl);
                const int s0 = 4 * c + nib, s1 = s0 + 2;
                const __m512 sc = _mm512_permutexvar_ps(_mm512_setr_epi32(s0, s0, s0, s0, s0, s0, s0, s0,
                                                                          s1, s1, s1, s1, s1, s1, s1, s1), ab);
                const float *xp = pb + (c * 2 + nib) * 64;
                UNROLL for (int t = 0; t < NT; t++) {
                    __m512 s = _mm512_mul_ps(v[0], _mm512_loadu_ps(xp + t * ldp));
                    UNROLL for (int k = 1; k < 4; k++) s = _mm512_fmadd_ps(v[k], _mm512_loadu_ps(xp + t * ldp + 16 * k), s);
                    tot[t] = _mm512_fmadd_ps(s, sc, tot[t]);
                }
            }
        }
    }
    UNROLL for (int t = 0; t < NT; t++) out[t] = _mm512_reduce_add_ps(tot[t]);
}

/* ---- Q6_K: x as it is. A half block's 128 six-bit values become bytes q - 32 with 512-bit byte ops,
 * then each 16 a float vector times its sub-block's d*scale: the very value ggml decodes. ---- */
INLINE void xr_q6_k(const uint8_t *restrict row, int64_t nb, const float *restrict x, int64_t ldx,
                    const float *restrict p, int64_t ldp, const int NT, float *out) {
    (void)p, (void)ldp;
    const int NA = NT == 1 ? 4 : NT == 2 ? 2 : 1;
    __m512 tot[FT][4];
    UNROLL for (int t = 0; t < NT; t++) UNROLL for (int a = 0; a < NA; a++) tot[t][a] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), k32 = _mm512_set1_epi8(32);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + 210 * b;
        __builtin_prefetch(blk + XPF);
        __builtin_prefetch(blk + XPF + 64);
        __builtin_prefetch(blk + XPF + 128);
        __builtin_prefetch(blk + XPF + 192);
        float a[16];
        _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)))),
                                          _mm512_set1_ps(rdh(blk + 208))));
        UNROLL for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512((const void *)(blk + 64 * h));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            const __m512i qh2 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
            /* bytes 0-31: elements 128h + l, 32-63: 128h + 32 + l (lo); 64 + l, 96 + l (hi); 0xF8: a | (b & c) */
            const __m512i lo = _mm512_ternarylogic_epi32(_mm512_and_si512(ql, m4), _mm512_slli_epi16(qh2, 4), m30, 0xF8);
            const __m512i hi = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), qh2, m30, 0xF8);
            int8_t q[128];
            _mm512_storeu_si512((void *)q, _mm512_sub_epi8(lo, k32));
            _mm512_storeu_si512((void *)(q + 64), _mm512_sub_epi8(hi, k32));
            SPILLED(q);
            SPILLED(a);
            UNROLL for (int v = 0; v < 8; v++) {
                const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * v)))),
                                               _mm512_set1_ps(a[8 * h + v]));
                const float *xv = x + 256 * b + 128 * h + 16 * v;
                UNROLL for (int t = 0; t < NT; t++) tot[t][v % NA] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xv + t * ldx), tot[t][v % NA]);
            }
        }
    }
    UNROLL for (int t = 0; t < NT; t++) {
        __m512 s = tot[t][0];
        UNROLL for (int a = 1; a < NA; a++) s = _mm512_add_ps(s, tot[t][a]);
        out[t] = _mm512_reduce_add_ps(s);
    }
}

/* The driver: rows outer (a row stays in L1 for every token), FT tokens per pass. */
#define PX_RANGE(NAME)                                                                                           \
    static void xm_##NAME(const struct px_job *j, int64_t r0, int64_t r1) {                                     \
        for (int64_t r = r0; r < r1; r++) {                                                                      \
            const uint8_t *row = j->w + r * j->row_bytes;                                                        \
            for (int64_t t = 0; t < j->n_tok;) {                                                                 \
                const int64_t left = j->n_tok - t;                                                               \
                const float *x = j->x + t * j->ldx, *p = j->p + t * j->ldp;                                      \
                float s[FT];                                                                                     \
                int nt;                                                                                          \
                if (left >= 4) nt = 4, xr_##NAME(row, j->nb, x, j->ldx, p, j->ldp, 4, s);                        \
                else if (left == 3) nt = 3, xr_##NAME(row, j->nb, x, j->ldx, p, j->ldp, 3, s);                   \
                else if (left == 2) nt = 2, xr_##NAME(row, j->nb, x, j->ldx, p, j->ldp, 2, s);                   \
                else nt = 1, xr_##NAME(row, j->nb, x, j->ldx, p, j->ldp, 1, s);                                  \
                for (int i = 0; i < nt; i++) j->y[(t + i) * j->ldy + r] = s[i];                                  \
                t += nt;                                                                                         \
            }                                                                                                    \
        }                                                                                                        \
    }
PX_RANGE(q4_0)
PX_RANGE(q4_1)
PX_RANGE(q8_0)
PX_RANGE(q4_k)
PX_RANGE(q6_k)

/* What vkp_matmul needs of a fast type: its row range, its x preparation and that form's floats. */
struct fast_info {
    void (*mm)(const struct px_job *, int64_t, int64_t);
    void (*px)(const float *, int64_t, float *);
    int64_t (*ldp)(int64_t nb);    /* floats of one token's prepared x */
    int max_tok;                   /* up to this many tokens; kernels.c's tile() is faster beyond */
};
static int64_t ldp_sums(int64_t nb) { return SUMS_PAD(nb); }
static int64_t ldp_none(int64_t nb) { (void)nb; return 0; }
static int64_t ldp_q4_k(int64_t nb) { return PXB_Q4_K * nb; }

static const struct fast_info *fast_info(int type) {
    static const struct fast_info q4_0 = {xm_q4_0, px_q4_0, ldp_sums, 3}, q4_1 = {xm_q4_1, px_q4_1, ldp_sums, 3},
                                  q8_0 = {xm_q8_0, px_none, ldp_none, 2}, q4_k = {xm_q4_k, px_q4_k, ldp_q4_k, 4},
                                  q6_k = {xm_q6_k, px_none, ldp_none, 3};
    switch (type) {
        case T_Q4_0: return &q4_0;
        case T_Q4_1: return &q4_1;
        case T_Q8_0: return &q8_0;
        case T_Q4_K: return &q4_k;
        case T_Q6_K: return &q6_k;
        default: return 0;
    }
}
