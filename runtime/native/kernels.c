/* vkpack native CPU kernels: y = x @ W^T and W -> f32, reading W as stored (GGML block layouts).
 *
 * Built on first use by runtime/native/loader.py with this machine's compiler:
 *   cc -O3 -march=native -ffp-contract=off -fopenmp -fPIC -shared
 * so the SIMD path is chosen at compile time for the host: AVX-512 (F, BW, VL), AVX2 (+FMA, F16C), else
 * portable C99. -DVKP_PORTABLE forces the portable path (the tests build it too). ARM gets the portable
 * path, which the compiler vectorizes with NEON where it can; there are no hand-written NEON decoders,
 * because nothing here could test them.
 * -ffp-contract=off: decoding must be exactly GGML's IEEE ops (`d*q - m` must not become one FMA, or
 * dequantize stops being bit-equal); the dot products ask for FMAs explicitly (vf_fma, FMA_F32).
 *
 * Structure: a row is decoded GROUP (32) elements at a time, straight into registers, by one decoder per
 * type, decv_<type>(row, g, k, w): group g of the row as GV vectors of VL floats, bit-equal to ggml's
 * dequantize_row_<type> (dec32_<type> is the plain-C reference form, used by the portable path; k holds
 * a K-block's scales, decoded once per block by prep_<type>). vkp_matmul multiplies RMAX rows' decoded
 * groups into up to TMAX token vectors at once (RMAX x TMAX f32 accumulators in registers: each x load
 * serves RMAX rows, each decode TMAX tokens); vkp_dequantize stores the groups. OpenMP threads take
 * contiguous ranges of rows.
 * Two faster paths take over where they exist: fast512.h (AVX-512, 1-4 tokens: per-type row kernels on
 * a prepared x, for Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) and gemm.h (every type and ISA, from GEMM_MIN_TOKENS
 * tokens on: decoded panels times all tokens). The tile() drivers below serve the rest. ops.h holds the
 * two prefill ops that are not products (causal attention, SwiGLU), on the same OpenMP threads.
 * Measured choices (interleaved A/B builds, one thread, a 2-core AVX-512 Xeon VM): a 4x4 tile beat 2x8
 * and 3x8 by 20-50% at n_tok 4 and 32 and lost up to 20% at n_tok 8; unrolling a K-block's 8 groups
 * (UNROLL_K) helps Q6_K and Q3_K and hurts Q2_K; converting small-block scales with integer ops once per
 * 8 blocks, and the Q4_K scales 4 bytes at a time, were both slower (not kept).
 * Little-endian hosts only: block fields are read with memcpy into native integers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
#define omp_get_thread_num() 0
#endif

#if !defined(VKP_PORTABLE) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VKP_AVX512 1
#elif !defined(VKP_PORTABLE) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VKP_AVX2 1
#endif
#if defined(VKP_AVX512) || defined(VKP_AVX2)
#define VKP_X86 1
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))
/* Small constant loops over registers (tile rows, tokens, vectors) must unroll fully to stay in registers. */
#define UNROLL _Pragma("GCC unroll 16")

/* GGML type ids (ggml.h `enum ggml_type`). They MUST match vkpack.pack_format.constants.GGML_TYPE_IDS,
 * which the Python side passes in; tests/test_native_kernels.py checks every type through it. */
enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23, T_BF16 = 30,
};

int vkp_abi_version(void) { return 6; }

/* The SIMD path this build took: 2 AVX-512, 1 AVX2, 0 portable C (the backend keeps BLAS for prefill
 * on the portable path, where gemm.h was never measured against it). */
int vkp_simd(void) {
#if defined(VKP_AVX512)
    return 2;
#elif defined(VKP_AVX2)
    return 1;
#else
    return 0;
#endif
}

#define PF_BYTES 512   /* software prefetch distance in each row (measured: +10% at decode, 1 thread) */
#define GROUP 32   /* elements decoded per step: one small block, 1/8 of a K-block, or 32 floats */
/* From this many tokens on, products go through gemm.h (decoded panels times all tokens); fewer run
 * the tile() drivers (4 rows x 4 tokens), or fast512.h up to its max_tok (1-4). Measured, 2 threads,
 * 4096x4096 from DRAM, Q4_K/Q6_K/Q4_1/Q8_0: gemm.h 1.1-2x faster than tile() at 16-32 tokens and
 * 10-20% slower at 12; tile() 1.3-1.6x faster than fast512.h at 4-8 tokens (but Q4_K's at 4). */
#ifndef GEMM_MIN_TOKENS
#define GEMM_MIN_TOKENS 16
#endif

/* ---- f32 vectors (vf, VL lanes) and the register tile: R rows x up to TMAX tokens ---- */
#if defined(VKP_AVX512)
#define VL 16
#define RMAX 4
#define TMAX 4
typedef __m512 vf;
typedef __m512i vi;
#define vf_zero() _mm512_setzero_ps()
#define vf_load(p) _mm512_loadu_ps(p)
#define vf_store(p, v) _mm512_storeu_ps(p, v)
#define vf_set1(a) _mm512_set1_ps(a)
#define vf_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vf_add(a, b) _mm512_add_ps(a, b)
#define vf_mul(a, b) _mm512_mul_ps(a, b)
#define vf_sub(a, b) _mm512_sub_ps(a, b)
#define vf_cvt(i) _mm512_cvtepi32_ps(i)
#define vf_f16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))           /* VL halves */
#define vi_u8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))          /* VL bytes */
#define vi_i8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define vi_u16(p) _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p)))
#define vi_set1(a) _mm512_set1_epi32(a)
#define vi_and(a, b) _mm512_and_si512(a, b)
#define vi_or(a, b) _mm512_or_si512(a, b)
#define vi_sub(a, b) _mm512_sub_epi32(a, b)
#define vi_add(a, b) _mm512_add_epi32(a, b)
#define vi_srl(a, n) _mm512_srl_epi32(a, _mm_cvtsi32_si128(n))
#define vi_sll(a, n) _mm512_sll_epi32(a, _mm_cvtsi32_si128(n))
#define vi_srlv(a, b) _mm512_srlv_epi32(a, b)
#define vi_iota() _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define vf_bits(i) _mm512_castsi512_ps(i)
INLINE float vf_sum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(VKP_AVX2)
#define VL 8
#define RMAX 2
#define TMAX 2
typedef __m256 vf;
typedef __m256i vi;
#define vf_zero() _mm256_setzero_ps()
#define vf_load(p) _mm256_loadu_ps(p)
#define vf_store(p, v) _mm256_storeu_ps(p, v)
#define vf_set1(a) _mm256_set1_ps(a)
#define vf_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vf_add(a, b) _mm256_add_ps(a, b)
#define vf_mul(a, b) _mm256_mul_ps(a, b)
#define vf_sub(a, b) _mm256_sub_ps(a, b)
#define vf_cvt(i) _mm256_cvtepi32_ps(i)
#define vf_f16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define vi_u8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define vi_i8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define vi_u16(p) _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define vi_set1(a) _mm256_set1_epi32(a)
#define vi_and(a, b) _mm256_and_si256(a, b)
#define vi_or(a, b) _mm256_or_si256(a, b)
#define vi_sub(a, b) _mm256_sub_epi32(a, b)
#define vi_add(a, b) _mm256_add_epi32(a, b)
#define vi_srl(a, n) _mm256_srl_epi32(a, _mm_cvtsi32_si128(n))
#define vi_sll(a, n) _mm256_sll_epi32(a, _mm_cvtsi32_si128(n))
#define vi_srlv(a, b) _mm256_srlv_epi32(a, b)
#define vi_iota() _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
#define vf_bits(i) _mm256_castsi256_ps(i)
INLINE float vf_sum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
/* Portable: plain C on 8-float structs; compilers keep them in SIMD registers where they can. */
#define VL 8
#define RMAX 2
#define TMAX 2
typedef struct { float v[VL]; } vf;
INLINE vf vf_zero(void) { vf z = {{0}}; return z; }
INLINE vf vf_load(const float *p) { vf r; memcpy(r.v, p, sizeof r.v); return r; }
INLINE void vf_store(float *p, vf a) { memcpy(p, a.v, sizeof a.v); }
INLINE vf vf_add(vf a, vf b) { for (int i = 0; i < VL; i++) a.v[i] += b.v[i]; return a; }
INLINE float vf_sum(vf a) { float s = 0; for (int i = 0; i < VL; i++) s += a.v[i]; return s; }
INLINE vf vf_set1(float a) { vf r; for (int i = 0; i < VL; i++) r.v[i] = a; return r; }
#endif
#define GV (GROUP / VL)   /* vectors per group */

#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define FMA_F32(a, b, c) __builtin_fmaf(a, b, c)
#else
#define FMA_F32(a, b, c) ((a) * (b) + (c))
#endif
#if !defined(VKP_X86)
INLINE vf vf_fma(vf a, vf b, vf c) { for (int i = 0; i < VL; i++) c.v[i] = FMA_F32(a.v[i], b.v[i], c.v[i]); return c; }
#endif

#include "decoders.h"   /* the formats: layouts, decoders */
#if defined(VKP_AVX512)
#include "fast512.h"    /* decode-time products of the common types on prepared activations */
#endif

/* ======================================================================================
 * Drivers, written once and instantiated per type (always_inline with a constant decoder).
 * ====================================================================================== */
typedef void (*decv_fn)(const uint8_t *restrict r, int64_t g, const struct kscales *k, vf *w);
typedef void (*prep_fn)(const uint8_t *r, int64_t blk, struct kscales *k);
typedef float (*el_fn)(const uint8_t *r, int64_t i);
/* What the drivers know of a type, all compile-time constants once inlined: its decoder, its K-block
 * prologue (prep) and groups per block (GPB), whether to unroll a block's groups (UNROLL_K), elements and
 * bytes per block (QK, BSZ: for the prefetch address), and the scalar decoder of a float row's tail (el). */
#define TYPE_PARAMS decv_fn dec, prep_fn prep, const int GPB, const int UNROLL_K, const int QK, const int BSZ, el_fn el
#define TYPE_ARGS dec, prep, GPB, UNROLL_K, QK, BSZ, el

struct mm_job {
    const uint8_t *w;    /* (rows, row_bytes) stored rows */
    int64_t row_bytes;   /* bytes per row */
    int64_t cols;        /* elements per row */
    const float *x;      /* (n_tok, ldx) f32 activations; cols of each row are used */
    int64_t ldx;
    int64_t n_tok;
    float *y;            /* (n_tok, ldy) f32 outputs; column r of each row is written */
    int64_t ldy;
};

/* One group g of the R rows: decode, then multiply into the R x NT accumulators (used inside tile()). */
#define TILE_GROUP(g)                                                                                        \
    do {                                                                                                     \
        vf wv[RMAX][GV]; /* (R, GROUP) decoded weights */                                                    \
        UNROLL for (int r = 0; r < R; r++)                                                                   \
            __builtin_prefetch(w + r * row_bytes + (g) * GROUP * BSZ / QK + PF_BYTES);                      \
        UNROLL for (int r = 0; r < R; r++) dec(w + r * row_bytes, (g), &ks[r], wv[r]);                      \
        const float *xg = x + (g) * GROUP;                                                                   \
        UNROLL for (int v = 0; v < GV; v++)                                                                  \
            UNROLL for (int t = 0; t < NT; t++) {                                                            \
                const vf xv = vf_load(xg + t * ldx + v * VL);                                                \
                UNROLL for (int r = 0; r < R; r++)                                                           \
                    acc[r][t][v % NA] = vf_fma(wv[r][v], xv, acc[r][t][v % NA]);                             \
            }                                                                                                \
    } while (0)

/* y[t*ldy + r] = row r . x[t*ldx + :cols] for r < R, t < NT: an R x NT register tile of f32 accumulators
 * (two per (row, token) when NT == 1, to keep two FMA chains per row in flight). */
INLINE void tile(TYPE_PARAMS, const int R, const int NT, const uint8_t *restrict w, int64_t row_bytes, int64_t cols,
                 const float *restrict x, int64_t ldx, float *restrict y, int64_t ldy) {
    /* w: (R, row_bytes) stored rows; x: (NT, ldx); y: (NT, ldy) */
    const int NA = NT == 1 ? 2 : 1;
    vf acc[RMAX][TMAX][2];
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int t = 0; t < NT; t++)
            UNROLL for (int a = 0; a < NA; a++) acc[r][t][a] = vf_zero();
    const int64_t ng = cols / GROUP;
    struct kscales ks[RMAX];                               /* the current K-block's scales, per row */
    for (int64_t g0 = 0; g0 < ng; g0 += GPB) {
        UNROLL for (int r = 0; r < R; r++) prep(w + r * row_bytes, g0 / GPB, &ks[r]);
        if (UNROLL_K) {   /* K-block offsets become constants: faster for some types, slower for others */
            UNROLL for (int64_t g = g0; g < g0 + GPB; g++) TILE_GROUP(g);
        } else {
            for (int64_t g = g0; g < g0 + GPB; g++) TILE_GROUP(g);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++) {
            vf a = acc[r][t][0];
            if (NA == 2) a = vf_add(a, acc[r][t][1]);
            float s = vf_sum(a);
            for (int64_t i = ng * GROUP; i < cols; i++) s = FMA_F32(el(w + r * row_bytes, i), x[t * ldx + i], s);
            y[t * ldy + r] = s;
        }
}

/* Rows r..r+R-1 against tokens t0..t1-1, TMAX tokens per sweep (the rows stay in L1 between sweeps). */
INLINE void sweep(TYPE_PARAMS, const int R, const struct mm_job *j, int64_t r, int64_t t0, int64_t t1) {
    const uint8_t *w = j->w + r * j->row_bytes;
    for (int64_t t = t0; t < t1;) {
        const int64_t left = t1 - t;
        const float *x = j->x + t * j->ldx;
        float *y = j->y + t * j->ldy + r;
        if (left >= TMAX) {
            tile(TYPE_ARGS, R, TMAX, w, j->row_bytes, j->cols, x, j->ldx, y, j->ldy);
            t += TMAX;
        } else if (left >= 2) {
            tile(TYPE_ARGS, R, 2, w, j->row_bytes, j->cols, x, j->ldx, y, j->ldy);
            t += 2;
        } else {
            tile(TYPE_ARGS, R, 1, w, j->row_bytes, j->cols, x, j->ldx, y, j->ldy);
            t += 1;
        }
    }
}

/* Tokens per tile of x: the tile stays in L2 (~1 MiB) while every row of the range sweeps it. */
static int64_t token_tile(int64_t cols) {
    const int64_t t = ((int64_t)1 << 20) / (4 * (cols > 0 ? cols : 1)) / TMAX * TMAX;
    return t < TMAX ? TMAX : t;
}

INLINE void mm_range(TYPE_PARAMS, const struct mm_job *j, int64_t r0, int64_t r1) {
    const int64_t tt = token_tile(j->cols);
    for (int64_t t0 = 0; t0 < j->n_tok; t0 += tt) {
        const int64_t t1 = t0 + tt < j->n_tok ? t0 + tt : j->n_tok;
        int64_t r = r0;
        for (; r + RMAX <= r1; r += RMAX) sweep(TYPE_ARGS, RMAX, j, r, t0, t1);
        for (; r < r1; r++) sweep(TYPE_ARGS, 1, j, r, t0, t1);
    }
}

struct dq_job {
    const uint8_t *w;   /* (rows, row_bytes) stored rows */
    int64_t row_bytes;
    int64_t cols;
    float *out;         /* (rows, cols) f32 */
};

INLINE void dq_range(TYPE_PARAMS, const struct dq_job *j, int64_t r0, int64_t r1) {
    (void)UNROLL_K, (void)QK, (void)BSZ;
    const int64_t ng = j->cols / GROUP;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = j->w + r * j->row_bytes;
        float *o = j->out + r * j->cols;                   /* (cols,) */
        struct kscales ks;
        for (int64_t g = 0; g < ng; g++) {
            vf wv[GV];
            if (g % GPB == 0) prep(row, g / GPB, &ks);
            dec(row, g, &ks, wv);
            UNROLL for (int v = 0; v < GV; v++) vf_store(o + g * GROUP + v * VL, wv[v]);
        }
        for (int64_t i = ng * GROUP; i < j->cols; i++) o[i] = el(row, i);
    }
}

#include "gemm.h"       /* many tokens: decoded panels times transposed x */
#include "ops.h"        /* prefill's attention and SwiGLU on the same threads */

/* One matmul and one dequantize function per type, and the table that picks them by GGML id. */
/* Columns: name, PREP, GPB, UNROLL_K (measured per type: +10-25% for Q3_K and Q6_K, -25% for Q2_K), QK, BSZ, el. */
#define TYPE_KERNELS(name, PREP, GPB, UNR, QK, BSZ, EL)                                \
    static void mm_##name(const struct mm_job *j, int64_t r0, int64_t r1) {            \
        mm_range(decv_##name, PREP, GPB, UNR, QK, BSZ, EL, j, r0, r1);                 \
    }                                                                                  \
    static void dq_##name(const struct dq_job *j, int64_t r0, int64_t r1) {            \
        dq_range(decv_##name, PREP, GPB, UNR, QK, BSZ, EL, j, r0, r1);                 \
    } \
    static void gm_##name(const struct gm_job *j, int64_t r0, int64_t r1, float *wp, float *c) { \
        gm_range(decv_##name, PREP, GPB, UNR, QK, BSZ, EL, j, r0, r1, wp, c);          \
    }
TYPE_KERNELS(f32, prep_none, 1, 0, 1, 4, el_f32)
TYPE_KERNELS(f16, prep_none, 1, 0, 1, 2, el_f16)
TYPE_KERNELS(bf16, prep_none, 1, 0, 1, 2, el_bf16)
TYPE_KERNELS(q8_0, prep_none, 1, 0, 32, 34, el_none)
TYPE_KERNELS(q4_0, prep_none, 1, 0, 32, 18, el_none)
TYPE_KERNELS(q4_1, prep_none, 1, 0, 32, 20, el_none)
TYPE_KERNELS(q5_0, prep_none, 1, 0, 32, 22, el_none)
TYPE_KERNELS(q5_1, prep_none, 1, 0, 32, 24, el_none)
TYPE_KERNELS(q2_k, prep_q2_k, 8, 0, 256, 84, el_none)
TYPE_KERNELS(q3_k, prep_q3_k, 8, 1, 256, 110, el_none)
TYPE_KERNELS(q4_k, prep_q4_k, 8, 0, 256, 144, el_none)
TYPE_KERNELS(q5_k, prep_q5_k, 8, 0, 256, 176, el_none)
TYPE_KERNELS(q6_k, prep_q6_k, 8, 1, 256, 210, el_none)
TYPE_KERNELS(iq4_nl, prep_none, 1, 0, 32, 18, el_none)
TYPE_KERNELS(iq4_xs, prep_iq4_xs, 8, 0, 256, 136, el_none)

struct type_info {
    int qk, bsz;    /* elements and bytes per block */
    void (*mm)(const struct mm_job *, int64_t, int64_t);
    void (*dq)(const struct dq_job *, int64_t, int64_t);
    void (*gm)(const struct gm_job *, int64_t, int64_t, float *, float *);
};

static const struct type_info *type_info(int type) {
#define ROW(id, name, QK, BSZ)                                             \
    case id: {                                                             \
        static const struct type_info i = {QK, BSZ, mm_##name, dq_##name, gm_##name}; \
        return &i;                                                         \
    }
    switch (type) {
        ROW(T_F32, f32, 1, 4)
        ROW(T_F16, f16, 1, 2)
        ROW(T_BF16, bf16, 1, 2)
        ROW(T_Q8_0, q8_0, 32, 34)
        ROW(T_Q4_0, q4_0, 32, 18)
        ROW(T_Q4_1, q4_1, 32, 20)
        ROW(T_Q5_0, q5_0, 32, 22)
        ROW(T_Q5_1, q5_1, 32, 24)
        ROW(T_Q2_K, q2_k, 256, 84)
        ROW(T_Q3_K, q3_k, 256, 110)
        ROW(T_Q4_K, q4_k, 256, 144)
        ROW(T_Q5_K, q5_k, 256, 176)
        ROW(T_Q6_K, q6_k, 256, 210)
        ROW(T_IQ4_NL, iq4_nl, 32, 18)
        ROW(T_IQ4_XS, iq4_xs, 256, 136)
        default: return 0;
    }
#undef ROW
}

/* The checks both entry points share: a known type, whole blocks, rows long enough. */
static const struct type_info *check(int type, int64_t row_bytes, int64_t rows, int64_t cols) {
    const struct type_info *ti = type_info(type);
    if (!ti || rows < 0 || cols < 0 || cols % ti->qk) return 0;
    if (row_bytes < cols / ti->qk * ti->bsz) return 0;
    return ti;
}

/* Threads: one contiguous range of rows each, boundaries on multiples of RMAX; 1 thread runs inline. */
#define PARALLEL_ROWS(n_threads, rows, CALL)                                        \
    do {                                                                             \
        const int64_t tiles_ = (rows) / RMAX;                                        \
        int nth_ = (n_threads) < 1 ? 1 : (n_threads);                                \
        if ((int64_t)nth_ > tiles_) nth_ = tiles_ > 1 ? (int)tiles_ : 1;             \
        if (nth_ == 1) {                                                             \
            const int64_t r0 = 0, r1 = (rows);                                       \
            CALL;                                                                    \
        } else {                                                                     \
            _Pragma("omp parallel for schedule(static, 1) num_threads(nth_)")        \
            for (int i_ = 0; i_ < nth_; i_++) {                                      \
                const int64_t r0 = tiles_ * i_ / nth_ * RMAX;                        \
                const int64_t r1 = i_ == nth_ - 1 ? (rows) : tiles_ * (i_ + 1) / nth_ * RMAX; \
                CALL;                                                                \
            }                                                                        \
        }                                                                            \
    } while (0)

#if defined(VKP_AVX512)
/* The product through fast512.h when the type has a kernel there: x prepared once (in a buffer of this
 * call), then rows split over threads. Returns 0 (not done) for other types, more than the type's
 * max_tok tokens, or when malloc fails. */
static int fast_matmul(int type, int64_t qk, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols,
                       const float *x, int64_t ldx, int64_t n_tok, float *y, int64_t ldy, int n_threads) {
    const struct fast_info *fi = fast_info(type);
    if (!fi || n_tok > fi->max_tok) return 0;
    const int64_t nb = cols / qk, ldp = fi->ldp(nb);
    float *p = 0;
    if (ldp) {
        p = aligned_alloc(64, (size_t)((n_tok * ldp * 4 + 63) / 64 * 64));
        if (!p) return 0;
        for (int64_t t = 0; t < n_tok; t++) fi->px(x + t * ldx, nb, p + t * ldp);
    }
    const struct px_job j = {w, row_bytes, nb, x, ldx, p ? p : x, ldp, n_tok, y, ldy};
    PARALLEL_ROWS(n_threads, rows, fi->mm(&j, r0, r1));
    free(p);
    return 1;
}
#endif

/* Many tokens (GEMM_MIN_TOKENS and more): x transposed once, then rows split over threads in whole
 * tiles of GR, each thread with its own panel and accumulators. Returns 0 (not done) when cols is not
 * whole groups or malloc fails. */
static int gemm_matmul(const struct type_info *ti, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols,
                       const float *x, int64_t ldx, int64_t n_tok, float *y, int64_t ldy, int n_threads) {
    if (cols % GROUP) return 0;
    const int64_t n_tv = (n_tok + VL - 1) / VL, tiles = (rows + GR - 1) / GR;
    int64_t kc = (int64_t)XT_BLOCK / (4 * VL * n_tv) / 256 * 256;             /* xt's block, in L2 */
    kc = kc < 256 ? 256 : kc > KC_MAX ? KC_MAX : kc;
    int nth = n_threads < 1 ? 1 : n_threads;
    if (nth > tiles) nth = (int)tiles;
    int64_t mc = (int64_t)C_BLOCK / (4 * VL * n_tv) / MC_UNIT * MC_UNIT;
    mc = mc < MC_UNIT ? MC_UNIT : mc;
    const int64_t per = GR * WPS + mc * n_tv * VL;                        /* a thread's panel and accumulators */
    float *xt = aligned_alloc(64, (size_t)(n_tv * XTS(cols) * 4)), *buf = aligned_alloc(64, (size_t)(nth * per * 4));
    if (!xt || !buf) {
        free(xt), free(buf);
        return 0;
    }
    gm_transpose(x, ldx, n_tok, cols, xt, n_tv, nth);
    const struct gm_job j = {w, row_bytes, cols, xt, n_tok, n_tv, kc, mc, y, ldy};
    /* Rows in chunks the threads take in turn, so that a thread slowed by another process on its core
     * takes fewer (fixed halves waited for it): at least 4 a thread, more where mc rows (the accumulators)
     * are fewer, their count a multiple of the threads' so that equal threads end together. */
    int64_t n_chunks = (rows + mc - 1) / mc > 4 * nth ? (rows + mc - 1) / mc : 4 * nth;
    n_chunks = (n_chunks + nth - 1) / nth * nth;
    int64_t chunk = (tiles + n_chunks - 1) / n_chunks * GR;
    chunk = chunk > mc ? mc : chunk;
    const int64_t chunks = (rows + chunk - 1) / chunk;
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        float *b = buf + (int64_t)omp_get_thread_num() * per;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < chunks; i++)
            ti->gm(&j, i * chunk, (i + 1) * chunk < rows ? (i + 1) * chunk : rows, b, b + GR * WPS);
    }
    free(xt), free(buf);
    return 1;
}

int vkp_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols,
               const float *x, int64_t ldx, int64_t n_tok, float *y, int64_t ldy, int n_threads) {
    /* w: (rows, row_bytes) stored rows; x: (n_tok, ldx) f32, ldx >= cols; y: (n_tok, ldy) f32, ldy >= rows */
    const struct type_info *ti = check(type, row_bytes, rows, cols);
    if (!ti || n_tok < 0 || (n_tok > 0 && (ldx < cols || ldy < rows))) return -1;
    if (rows == 0 || n_tok == 0) return 0;
    if (n_tok >= GEMM_MIN_TOKENS && gemm_matmul(ti, w, row_bytes, rows, cols, x, ldx, n_tok, y, ldy, n_threads))
        return 0;
#if defined(VKP_AVX512)
    if (fast_matmul(type, ti->qk, w, row_bytes, rows, cols, x, ldx, n_tok, y, ldy, n_threads)) return 0;
#endif
    const struct mm_job j = {w, row_bytes, cols, x, ldx, n_tok, y, ldy};
    PARALLEL_ROWS(n_threads, rows, ti->mm(&j, r0, r1));
    return 0;
}

int vkp_dequantize(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols,
                   float *out, int n_threads) {
    /* w: (rows, row_bytes) stored rows; out: (rows, cols) f32 */
    const struct type_info *ti = check(type, row_bytes, rows, cols);
    if (!ti) return -1;
    if (rows == 0 || cols == 0) return 0;
    const struct dq_job j = {w, row_bytes, cols, out};
    PARALLEL_ROWS(n_threads, rows, ti->dq(&j, r0, r1));
    return 0;
}

#include "experts.h"    /* a mixture's experts for a few rows, in one parallel region */
#include "program.h"    /* a decode step (attention block, MLP) in one parallel region */

/* The benchmark's yardstick (tools/bench_native.py): read n bytes (n a multiple of 8) on n_threads threads
 * with this compiler and these flags; returns their sum as 64-bit words so the reads cannot be skipped. */
uint64_t vkp_bench_read(const uint8_t *p, int64_t n, int n_threads) {
    /* p: (n,) bytes */
    uint64_t total = 0;
    const int64_t words = n / 8;
    const int nth = n_threads < 1 ? 1 : n_threads;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(nth)
    for (int64_t i = 0; i < words; i++) {
        uint64_t v;
        memcpy(&v, p + 8 * i, 8);
        total += v;
    }
    return total;
}
