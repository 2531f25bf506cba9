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
 * type, dec_<type>(row, g, w): group g of the row as GV vectors of VL floats, bit-equal to ggml's
 * dequantize_row_<type>. vkp_matmul multiplies R rows' decoded groups into NT token vectors at once
 * (R x NT f32 accumulators in registers: each x load serves R rows, each decode NT tokens);
 * vkp_dequantize stores the groups. OpenMP threads take contiguous ranges of rows.
 * Little-endian hosts only: block fields are read with memcpy into native integers.
 */
#include <stdint.h>
#include <string.h>

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
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30,
};

int vkp_abi_version(void) { return 1; }

#define PF_BYTES 512   /* software prefetch distance in each row (measured: +10% at decode, 1 thread) */
#define GROUP 32   /* elements decoded per step: one small block, 1/8 of a K-block, or 32 floats */

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

/* ---- scalar helpers ---- */
INLINE uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
INLINE uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
INLINE float f32_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t bits_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* IEEE half -> float, exact (F16C's conversion quiets a signaling NaN; nothing else differs). */
INLINE float h2f(uint16_t h) {
#if defined(VKP_X86)
    return _cvtsh_ss(h);
#else
    /* Maratyszcza's branch-free conversion (FP16 library, also ggml's portable path). */
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normal = f32_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormal = f32_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return f32_bits(sign | (two_w < (1u << 27) ? bits_f32(denormal) : bits_f32(normal)));
#endif
}
INLINE float rdh(const uint8_t *p) { return h2f(rd16(p)); }

/* Q4_K/Q5_K: six-bit scale and min of sub-block j of the 12 `scales` bytes (ggml's get_scale_min_k4). */
INLINE void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q3_K: scale i (0..15) of the 12 `scales` bytes: low 4 bits from bytes 0-7, high 2 from bytes 8-11. */
INLINE int scale_q3_k(int i, const uint8_t *s) {
    const int lo = i < 8 ? s[i] & 15 : s[i - 8] >> 4, hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}

/* ======================================================================================
 * Layouts. A row is whole blocks; group g covers elements 32g..32g+31.
 *
 * F32, F16 (IEEE half), BF16 (the top 16 bits of an f32): plain arrays; rows need not be whole groups.
 * 32-element blocks, x[j] for j < 32:
 *   Q8_0 (34 B): f16 d, int8 q[32];                x[j] = q[j] * d
 *   Q4_0 (18 B): f16 d, u8 qs[16];                 q = qs[j] & 15 (j < 16) or qs[j-16] >> 4; x = (q - 8) * d
 *   Q4_1 (20 B): f16 d, f16 m, u8 qs[16];          x = q * d + m
 *   Q5_0 (22 B): f16 d, u32 qh, u8 qs[16];         q = Q4 nibble | bit j of qh << 4; x = (q - 16) * d
 *   Q5_1 (24 B): f16 d, f16 m, u32 qh, u8 qs[16];  x = q * d + m
 * 256-element K-blocks: 8 groups of 32; group s = 4h + j (Q2_K, Q3_K, Q6_K) or 2j + hi (Q4_K, Q5_K):
 *   Q2_K (84 B): u8 scales[16] (low nibble scale, high nibble min), u8 qs[64], f16 d, f16 dmin.
 *     x[l] = (d * (sc & 15)) * ((qs[32h + l] >> 2j) & 3) - dmin * (sc >> 4), sc = scales[8h + 2j + l/16]
 *   Q3_K (110 B): u8 hmask[32], u8 qs[64], u8 scales[12] (16 six-bit scales, minus 32), f16 d.
 *     q = (qs[32h + l] >> 2j) & 3, minus 4 unless bit 4h+j of hmask[l] is set; x = (d * scale[8h+2j+l/16]) * q
 *   Q4_K (144 B): f16 d, f16 dmin, u8 scales[12] (8 six-bit scales and mins), u8 qs[128].
 *     q = qs[32j + l] & 15 (hi = 0) or >> 4 (hi = 1); x = (d * sc[s]) * q - dmin * m[s]
 *   Q5_K (176 B): f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]: Q4_K's q | bit s of qh[l] << 4
 *   Q6_K (210 B): u8 ql[128], u8 qh[64], int8 scales[16], f16 d; group s = 4h + k:
 *     q = (ql[64h + 32(k&1) + l] >> 4(k>>1)) & 15 | ((qh[32h + l] >> 2k) & 3) << 4;
 *     x = (d * scales[8h + 2k + l/16]) * (q - 32)
 * ====================================================================================== */

/* ---- portable decoders: group g of a row into o[32], ggml's reference arithmetic ---- */
INLINE void dec32_f32(const uint8_t *restrict r, int64_t g, float *restrict o) { memcpy(o, r + 128 * g, 128); }

INLINE void dec32_f16(const uint8_t *restrict r, int64_t g, float *restrict o) {
    for (int i = 0; i < 32; i++) o[i] = rdh(r + 64 * g + 2 * i);
}

INLINE void dec32_bf16(const uint8_t *restrict r, int64_t g, float *restrict o) {
    for (int i = 0; i < 32; i++) o[i] = f32_bits((uint32_t)rd16(r + 64 * g + 2 * i) << 16);
}

INLINE void dec32_q8_0(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 34 * g;
    const float d = rdh(b);
    for (int j = 0; j < 32; j++) o[j] = (float)(int8_t)b[2 + j] * d;
}

INLINE void dec32_q4_0(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 18 * g, *qs = b + 2;
    const float d = rdh(b);
    for (int j = 0; j < 16; j++) o[j] = (float)((qs[j] & 15) - 8) * d;
    for (int j = 0; j < 16; j++) o[j + 16] = (float)((qs[j] >> 4) - 8) * d;
}

INLINE void dec32_q4_1(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 20 * g, *qs = b + 4;
    const float d = rdh(b), m = rdh(b + 2);
    for (int j = 0; j < 16; j++) o[j] = (float)(qs[j] & 15) * d + m;
    for (int j = 0; j < 16; j++) o[j + 16] = (float)(qs[j] >> 4) * d + m;
}

INLINE void dec32_q5_0(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 22 * g, *qs = b + 6;
    const float d = rdh(b);
    const uint32_t qh = rd32(b + 2);
    for (int j = 0; j < 16; j++) o[j] = (float)((int)((qs[j] & 15) | (((qh >> j) & 1) << 4)) - 16) * d;
    for (int j = 0; j < 16; j++) o[j + 16] = (float)((int)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) * d;
}

INLINE void dec32_q5_1(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 24 * g, *qs = b + 8;
    const float d = rdh(b), m = rdh(b + 2);
    const uint32_t qh = rd32(b + 4);
    for (int j = 0; j < 16; j++) o[j] = (float)((qs[j] & 15) | (((qh >> j) & 1) << 4)) * d + m;
    for (int j = 0; j < 16; j++) o[j + 16] = (float)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) * d + m;
}

INLINE void dec32_q2_k(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 84 * (g >> 3);
    const int s = (int)(g & 7), h = s >> 2, j = s & 3;
    const float d = rdh(b + 80), dmin = rdh(b + 82);
    for (int k = 0; k < 2; k++) {
        const int sc = b[8 * h + 2 * j + k];
        const float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
        const uint8_t *q = b + 16 + 32 * h + 16 * k;
        for (int l = 0; l < 16; l++) o[16 * k + l] = dl * (float)((q[l] >> (2 * j)) & 3) - ml;
    }
}

INLINE void dec32_q3_k(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 110 * (g >> 3), *q = b + 32 + 32 * ((g & 7) >> 2);
    const int s = (int)(g & 7), h = s >> 2, j = s & 3;
    const float d = rdh(b + 108);
    for (int k = 0; k < 2; k++) {
        const float dl = d * (float)scale_q3_k(8 * h + 2 * j + k, b + 96);
        for (int l = 16 * k; l < 16 * k + 16; l++)
            o[l] = dl * (float)((int)((q[l] >> (2 * j)) & 3) - ((b[l] >> (4 * h + j)) & 1 ? 0 : 4));
    }
}

INLINE void dec32_q4_k(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 144 * (g >> 3);
    const int s = (int)(g & 7), shift = 4 * (s & 1);
    const uint8_t *q = b + 16 + 32 * (s >> 1);
    int sc, m;
    scale_min_k4(s, b + 4, &sc, &m);
    const float d1 = rdh(b) * (float)sc, m1 = rdh(b + 2) * (float)m;
    for (int l = 0; l < 32; l++) o[l] = d1 * (float)((q[l] >> shift) & 15) - m1;
}

INLINE void dec32_q5_k(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 176 * (g >> 3), *qh = b + 16;
    const int s = (int)(g & 7), shift = 4 * (s & 1);
    const uint8_t *q = b + 48 + 32 * (s >> 1);
    int sc, m;
    scale_min_k4(s, b + 4, &sc, &m);
    const float d1 = rdh(b) * (float)sc, m1 = rdh(b + 2) * (float)m;
    for (int l = 0; l < 32; l++) o[l] = d1 * (float)(((q[l] >> shift) & 15) | (((qh[l] >> s) & 1) << 4)) - m1;
}

INLINE void dec32_q6_k(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 210 * (g >> 3);
    const int s = (int)(g & 7), h = s >> 2, k = s & 3;
    const uint8_t *ql = b + 64 * h + 32 * (k & 1), *qh = b + 128 + 32 * h;
    const int8_t *sc = (const int8_t *)(b + 192) + 8 * h + 2 * k;
    const float d = rdh(b + 208);
    for (int l = 0; l < 32; l++) {
        const int q = ((ql[l] >> (4 * (k >> 1))) & 15) | (((qh[l] >> (2 * k)) & 3) << 4);
        o[l] = (d * (float)sc[l / 16]) * (float)(q - 32);
    }
}

/* ---- K-block scales: decoded once per block and row into L1 (then a broadcast costs one load) ----
 * a[i], b[i]: the multiplier and the subtrahend of sub-block i, the same products ggml computes. */
struct kscales { float a[16], b[16]; };

INLINE void prep_none(const uint8_t *r, int64_t blk, struct kscales *k) { (void)r; (void)blk; (void)k; }

INLINE void prep_q2_k(const uint8_t *r, int64_t blk, struct kscales *k) {
    const uint8_t *b = r + 84 * blk;
    const float d = rdh(b + 80), dmin = rdh(b + 82);
    for (int i = 0; i < 16; i++) {
        k->a[i] = d * (float)(b[i] & 15);
        k->b[i] = dmin * (float)(b[i] >> 4);
    }
}

INLINE void prep_q3_k(const uint8_t *r, int64_t blk, struct kscales *k) {
    const uint8_t *b = r + 110 * blk;
    const float d = rdh(b + 108);
    for (int i = 0; i < 16; i++) k->a[i] = d * (float)scale_q3_k(i, b + 96);
}

INLINE void prep_k4(const uint8_t *b, struct kscales *k) {   /* Q4_K, Q5_K: d, dmin, scales[12] */
    const float d = rdh(b), dmin = rdh(b + 2);
    for (int s = 0; s < 8; s++) {
        int sc, m;
        scale_min_k4(s, b + 4, &sc, &m);
        k->a[s] = d * (float)sc;
        k->b[s] = dmin * (float)m;
    }
}
INLINE void prep_q4_k(const uint8_t *r, int64_t blk, struct kscales *k) { prep_k4(r + 144 * blk, k); }
INLINE void prep_q5_k(const uint8_t *r, int64_t blk, struct kscales *k) { prep_k4(r + 176 * blk, k); }

INLINE void prep_q6_k(const uint8_t *r, int64_t blk, struct kscales *k) {
    const uint8_t *b = r + 210 * blk;
    const float d = rdh(b + 208);
    for (int i = 0; i < 16; i++) k->a[i] = d * (float)(int8_t)b[192 + i];
}

/* ---- x86 decoders (AVX2 and AVX-512 share them through the vi/vf macros): group g -> w[GV] ----
 * Vector v holds elements e0 = v*VL .. e0+VL-1 of the group. Same IEEE ops as above, lane by lane.
 * k: the group's K-block scales (from prep_<type>); unused by the other types. */
#if defined(VKP_X86)
#define DECV(name) INLINE void decv_##name(const uint8_t *restrict r, int64_t g, const struct kscales *k, vf *w)

DECV(f32) {
    (void)k;
    UNROLL for (int v = 0; v < GV; v++) w[v] = vf_load((const float *)(r + 128 * g) + v * VL);
}

DECV(f16) {
    (void)k;
    UNROLL for (int v = 0; v < GV; v++) w[v] = vf_f16(r + 64 * g + 2 * VL * v);
}

DECV(bf16) {
    (void)k;
    UNROLL for (int v = 0; v < GV; v++) w[v] = vf_bits(vi_sll(vi_u16(r + 64 * g + 2 * VL * v), 16));
}

DECV(q8_0) {
    (void)k;
    const uint8_t *b = r + 34 * g;
    const vf d = vf_set1(rdh(b));
    UNROLL for (int v = 0; v < GV; v++) w[v] = vf_mul(vf_cvt(vi_i8(b + 2 + VL * v)), d);
}

DECV(q2_k) {
    const int s = (int)(g & 7), h = s >> 2, j = s & 3;
    const uint8_t *q = r + 84 * (g >> 3) + 16 + 32 * h;
    UNROLL for (int v = 0; v < GV; v++) {
        const int i = 2 * s + v * VL / 16;                  /* sub-block of 16 */
        const vi x = vi_and(vi_srl(vi_u8(q + VL * v), 2 * j), vi_set1(3));
        w[v] = vf_sub(vf_mul(vf_cvt(x), vf_set1(k->a[i])), vf_set1(k->b[i]));
    }
}

DECV(q3_k) {
    const uint8_t *b = r + 110 * (g >> 3);
    const int s = (int)(g & 7), h = s >> 2, j = s & 3;
    UNROLL for (int v = 0; v < GV; v++) {
        const vi x = vi_and(vi_srl(vi_u8(b + 32 + 32 * h + VL * v), 2 * j), vi_set1(3));
        const vi m = vi_sll(vi_and(vi_srl(vi_u8(b + VL * v), 4 * h + j), vi_set1(1)), 2);   /* 4 if set */
        w[v] = vf_mul(vf_cvt(vi_sub(vi_or(x, m), vi_set1(4))), vf_set1(k->a[2 * s + v * VL / 16]));
    }
}

/* The 4-bit value of each lane: element e0+i is nibble (e0 >= 16) of qs[(e0 + i) % 16]. */
INLINE vi nibbles(const uint8_t *qs, int e0) {
    const vi q = vi_u8(qs + e0 % 16);
    return e0 >= 16 ? vi_srl(q, 4) : vi_and(q, vi_set1(15));
}

/* Q5_0/Q5_1: bit e of qh, for lanes e = e0.., moved to bit 4. */
INLINE vi qh_bits(uint32_t qh, int e0) {
    return vi_sll(vi_and(vi_srlv(vi_set1((int)qh), vi_add(vi_iota(), vi_set1(e0))), vi_set1(1)), 4);
}
#endif

#if defined(VKP_AVX512)
/* AVX-512: a 4-bit value indexes a 16-entry table of its decoded floats (one vpermps per 16 lanes; the
 * table entries are the very products the reference computes, so results stay bit-equal). 5-bit values
 * pick from two tables with the high bit as a lane mask. */
INLINE vf iota_f(float base) {
    return _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vf_set1(base));
}

DECV(q4_0) {
    (void)k;
    const uint8_t *b = r + 18 * g;
    const vf t = vf_mul(iota_f(-8), vf_set1(rdh(b)));                      /* (i - 8) * d */
    const vi q = vi_u8(b + 2);
    w[0] = _mm512_permutexvar_ps(q, t);                                     /* vpermps reads bits 0-3 */
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
}

DECV(q4_1) {
    (void)k;
    const uint8_t *b = r + 20 * g;
    const vf t = vf_add(vf_mul(iota_f(0), vf_set1(rdh(b))), vf_set1(rdh(b + 2)));   /* i * d + m */
    const vi q = vi_u8(b + 4);
    w[0] = _mm512_permutexvar_ps(q, t);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
}

DECV(q5_0) {
    (void)k;
    const uint8_t *b = r + 22 * g;
    const vf d = vf_set1(rdh(b));
    const vf t0 = vf_mul(iota_f(-16), d), t1 = vf_mul(iota_f(0), d);     /* (q - 16) * d, q < 16 and >= 16 */
    const uint32_t qh = rd32(b + 2);
    const vi q = vi_u8(b + 6), q1 = _mm512_srli_epi32(q, 4);
    w[0] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(q, t0), (__mmask16)qh, q, t1);
    w[1] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(q1, t0), (__mmask16)(qh >> 16), q1, t1);
}

DECV(q5_1) {
    (void)k;
    const uint8_t *b = r + 24 * g;
    const vf d = vf_set1(rdh(b)), m = vf_set1(rdh(b + 2));
    const vf t0 = vf_add(vf_mul(iota_f(0), d), m), t1 = vf_add(vf_mul(iota_f(16), d), m);
    const uint32_t qh = rd32(b + 4);
    const vi q = vi_u8(b + 8), q1 = _mm512_srli_epi32(q, 4);
    w[0] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(q, t0), (__mmask16)qh, q, t1);
    w[1] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(q1, t0), (__mmask16)(qh >> 16), q1, t1);
}

DECV(q4_k) {
    const int s = (int)(g & 7);
    const uint8_t *q = r + 144 * (g >> 3) + 16 + 32 * (s >> 1);
    const vf t = vf_sub(vf_mul(iota_f(0), vf_set1(k->a[s])), vf_set1(k->b[s]));   /* d*sc * i - dmin*m */
    UNROLL for (int v = 0; v < 2; v++) {
        const vi x = vi_u8(q + 16 * v);
        w[v] = _mm512_permutexvar_ps(s & 1 ? _mm512_srli_epi32(x, 4) : x, t);
    }
}

DECV(q5_k) {
    const uint8_t *b = r + 176 * (g >> 3);
    const int s = (int)(g & 7);
    const uint8_t *q = b + 48 + 32 * (s >> 1);
    const vf d1 = vf_set1(k->a[s]), m1 = vf_set1(k->b[s]);
    const vf t0 = vf_sub(vf_mul(iota_f(0), d1), m1), t1 = vf_sub(vf_mul(iota_f(16), d1), m1);
    const __mmask32 hb = _mm256_test_epi8_mask(_mm256_loadu_si256((const __m256i *)(b + 16)),
                                               _mm256_set1_epi8((char)(1 << s)));
    UNROLL for (int v = 0; v < 2; v++) {
        vi x = vi_u8(q + 16 * v);
        if (s & 1) x = _mm512_srli_epi32(x, 4);
        w[v] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(x, t0), (__mmask16)(hb >> (16 * v)), x, t1);
    }
}

/* Q6_K: the 32 six-bit values as bytes (one ymm of byte ops), then widened 16 at a time. */
DECV(q6_k) {
    const uint8_t *b = r + 210 * (g >> 3);
    const int s = (int)(g & 7), h = s >> 2, j = s & 3;
    const __m256i ql = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (j & 1)));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
    const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (j >> 1))), _mm256_set1_epi8(15));
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j)), _mm256_set1_epi8(3));
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
    w[0] = vf_mul(vf_cvt(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), vf_set1(k->a[2 * s]));
    w[1] = vf_mul(vf_cvt(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), vf_set1(k->a[2 * s + 1]));
}

#elif defined(VKP_AVX2)
DECV(q4_0) {
    (void)k;
    const uint8_t *b = r + 18 * g;
    const vf d = vf_set1(rdh(b));
    UNROLL for (int v = 0; v < GV; v++) w[v] = vf_mul(vf_cvt(vi_sub(nibbles(b + 2, VL * v), vi_set1(8))), d);
}

DECV(q4_1) {
    (void)k;
    const uint8_t *b = r + 20 * g;
    const vf d = vf_set1(rdh(b)), m = vf_set1(rdh(b + 2));
    UNROLL for (int v = 0; v < GV; v++) w[v] = vf_add(vf_mul(vf_cvt(nibbles(b + 4, VL * v)), d), m);
}

DECV(q5_0) {
    (void)k;
    const uint8_t *b = r + 22 * g;
    const vf d = vf_set1(rdh(b));
    const uint32_t qh = rd32(b + 2);
    UNROLL for (int v = 0; v < GV; v++)
        w[v] = vf_mul(vf_cvt(vi_sub(vi_or(nibbles(b + 6, VL * v), qh_bits(qh, VL * v)), vi_set1(16))), d);
}

DECV(q5_1) {
    (void)k;
    const uint8_t *b = r + 24 * g;
    const vf d = vf_set1(rdh(b)), m = vf_set1(rdh(b + 2));
    const uint32_t qh = rd32(b + 4);
    UNROLL for (int v = 0; v < GV; v++)
        w[v] = vf_add(vf_mul(vf_cvt(vi_or(nibbles(b + 8, VL * v), qh_bits(qh, VL * v))), d), m);
}

DECV(q4_k) {
    const int s = (int)(g & 7);
    const uint8_t *q = r + 144 * (g >> 3) + 16 + 32 * (s >> 1);
    const vf d1 = vf_set1(k->a[s]), m1 = vf_set1(k->b[s]);
    UNROLL for (int v = 0; v < GV; v++) {
        const vi x = vi_u8(q + VL * v);
        w[v] = vf_sub(vf_mul(vf_cvt(s & 1 ? vi_srl(x, 4) : vi_and(x, vi_set1(15))), d1), m1);
    }
}

DECV(q5_k) {
    const uint8_t *b = r + 176 * (g >> 3);
    const int s = (int)(g & 7);
    const uint8_t *q = b + 48 + 32 * (s >> 1);
    const vf d1 = vf_set1(k->a[s]), m1 = vf_set1(k->b[s]);
    UNROLL for (int v = 0; v < GV; v++) {
        const vi x = vi_u8(q + VL * v), h = vi_sll(vi_and(vi_srl(vi_u8(b + 16 + VL * v), s), vi_set1(1)), 4);
        w[v] = vf_sub(vf_mul(vf_cvt(vi_or(s & 1 ? vi_srl(x, 4) : vi_and(x, vi_set1(15)), h)), d1), m1);
    }
}

DECV(q6_k) {
    const uint8_t *b = r + 210 * (g >> 3);
    const int s = (int)(g & 7), h = s >> 2, j = s & 3;
    const uint8_t *ql = b + 64 * h + 32 * (j & 1), *qh = b + 128 + 32 * h;
    UNROLL for (int v = 0; v < GV; v++) {
        const vi lo = vi_and(vi_srl(vi_u8(ql + VL * v), 4 * (j >> 1)), vi_set1(15));
        const vi hi = vi_sll(vi_and(vi_srl(vi_u8(qh + VL * v), 2 * j), vi_set1(3)), 4);
        w[v] = vf_mul(vf_cvt(vi_sub(vi_or(lo, hi), vi_set1(32))), vf_set1(k->a[2 * s + v * VL / 16]));
    }
}
#endif

/* Without x86 SIMD every type uses its portable decoder through a 32-float buffer. */
#if !defined(VKP_X86)
#define PORTABLE_DECV(name)                                                                          \
    INLINE void decv_##name(const uint8_t *restrict r, int64_t g, const struct kscales *k, vf *w) { \
        float o[GROUP];                                                                              \
        (void)k;                                                                                     \
        dec32_##name(r, g, o);                                                                       \
        for (int v = 0; v < GV; v++) w[v] = vf_load(o + VL * v);                                     \
    }
PORTABLE_DECV(f32) PORTABLE_DECV(f16) PORTABLE_DECV(bf16) PORTABLE_DECV(q8_0) PORTABLE_DECV(q4_0)
PORTABLE_DECV(q4_1) PORTABLE_DECV(q5_0) PORTABLE_DECV(q5_1) PORTABLE_DECV(q2_k) PORTABLE_DECV(q3_k)
PORTABLE_DECV(q4_k) PORTABLE_DECV(q5_k) PORTABLE_DECV(q6_k)
#endif

/* Elements past the last whole group: float types only (a quantized row is whole groups). */
INLINE float el_f32(const uint8_t *r, int64_t i) { return f32_bits(rd32(r + 4 * i)); }
INLINE float el_f16(const uint8_t *r, int64_t i) { return rdh(r + 2 * i); }
INLINE float el_bf16(const uint8_t *r, int64_t i) { return f32_bits((uint32_t)rd16(r + 2 * i) << 16); }
INLINE float el_none(const uint8_t *r, int64_t i) { (void)r; (void)i; return 0.0f; }

/* ======================================================================================
 * Drivers, written once and instantiated per type (always_inline with a constant decoder).
 * ====================================================================================== */
typedef void (*decv_fn)(const uint8_t *restrict r, int64_t g, const struct kscales *k, vf *w);
typedef void (*prep_fn)(const uint8_t *r, int64_t blk, struct kscales *k);
typedef float (*el_fn)(const uint8_t *r, int64_t i);

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
        UNROLL for (int r = 0; r < R; r++) __builtin_prefetch(w + r * row_bytes + ((g) * GROUP * BSZ) / QK + PF_BYTES); \
        UNROLL for (int r = 0; r < R; r++) dec(w + r * row_bytes, (g), &ks[r], wv[r]);                      \
        const float *xg = x + (g) * GROUP;                                                                   \
        UNROLL for (int v = 0; v < GV; v++)                                                                  \
            UNROLL for (int t = 0; t < NT; t++) {                                                            \
                const vf xv = vf_load(xg + t * ldx + v * VL);                                                \
                UNROLL for (int r = 0; r < R; r++) acc[r][t][v % NA] = vf_fma(wv[r][v], xv, acc[r][t][v % NA]); \
            }                                                                                                \
    } while (0)

/* y[t*ldy + r] = row r . x[t*ldx + :cols] for r < R, t < NT: an R x NT register tile of f32 accumulators
 * (two per pair when NT == 1, to keep two FMA chains per row in flight). */
INLINE void tile(decv_fn dec, prep_fn prep, const int GPB, const int UNROLL_K, const int QK, const int BSZ, el_fn el, const int R, const int NT, const uint8_t *restrict w, int64_t row_bytes,
                 int64_t cols, const float *restrict x, int64_t ldx, float *restrict y, int64_t ldy) {
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
INLINE void sweep(decv_fn dec, prep_fn prep, const int GPB, const int UNROLL_K, const int QK, const int BSZ, el_fn el, const int R, const struct mm_job *j, int64_t r, int64_t t0, int64_t t1) {
    const uint8_t *w = j->w + r * j->row_bytes;
    for (int64_t t = t0; t < t1;) {
        const int64_t left = t1 - t;
        const float *x = j->x + t * j->ldx;
        float *y = j->y + t * j->ldy + r;
        if (left >= TMAX) {
            tile(dec, prep, GPB, UNROLL_K, QK, BSZ, el, R, TMAX, w, j->row_bytes, j->cols, x, j->ldx, y, j->ldy);
            t += TMAX;
        } else if (left >= 2) {
            tile(dec, prep, GPB, UNROLL_K, QK, BSZ, el, R, 2, w, j->row_bytes, j->cols, x, j->ldx, y, j->ldy);
            t += 2;
        } else {
            tile(dec, prep, GPB, UNROLL_K, QK, BSZ, el, R, 1, w, j->row_bytes, j->cols, x, j->ldx, y, j->ldy);
            t += 1;
        }
    }
}

/* Tokens per tile of x: the tile stays in L2 (~1 MiB) while every row of the range sweeps it. */
static int64_t token_tile(int64_t cols) {
    const int64_t t = ((int64_t)1 << 20) / (4 * (cols > 0 ? cols : 1)) / TMAX * TMAX;
    return t < TMAX ? TMAX : t;
}

INLINE void mm_range(decv_fn dec, prep_fn prep, const int GPB, const int UNROLL_K, const int QK, const int BSZ, el_fn el, const struct mm_job *j, int64_t r0, int64_t r1) {
    const int64_t tt = token_tile(j->cols);
    for (int64_t t0 = 0; t0 < j->n_tok; t0 += tt) {
        const int64_t t1 = t0 + tt < j->n_tok ? t0 + tt : j->n_tok;
        int64_t r = r0;
        for (; r + RMAX <= r1; r += RMAX) sweep(dec, prep, GPB, UNROLL_K, QK, BSZ, el, RMAX, j, r, t0, t1);
        for (; r < r1; r++) sweep(dec, prep, GPB, UNROLL_K, QK, BSZ, el, 1, j, r, t0, t1);
    }
}

struct dq_job {
    const uint8_t *w;   /* (rows, row_bytes) stored rows */
    int64_t row_bytes;
    int64_t cols;
    float *out;         /* (rows, cols) f32 */
};

INLINE void dq_range(decv_fn dec, prep_fn prep, const int GPB, el_fn el, const struct dq_job *j, int64_t r0, int64_t r1) {
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

/* One matmul and one dequantize function per type, and the table that picks them by GGML id. */
#define TYPE_KERNELS(name, PREP, GPB, UNR, QK, BSZ, EL)                                          \
    static void mm_##name(const struct mm_job *j, int64_t r0, int64_t r1) {          \
        mm_range(decv_##name, PREP, GPB, UNR, QK, BSZ, EL, j, r0, r1);                             \
    }                                                                                \
    static void dq_##name(const struct dq_job *j, int64_t r0, int64_t r1) {          \
        dq_range(decv_##name, PREP, GPB, EL, j, r0, r1);                             \
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

struct type_info {
    int qk, bsz;    /* elements and bytes per block */
    void (*mm)(const struct mm_job *, int64_t, int64_t);
    void (*dq)(const struct dq_job *, int64_t, int64_t);
};

static const struct type_info *type_info(int type) {
#define ROW(id, name, QK, BSZ)                                             \
    case id: {                                                             \
        static const struct type_info i = {QK, BSZ, mm_##name, dq_##name}; \
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

int vkp_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols,
               const float *x, int64_t ldx, int64_t n_tok, float *y, int64_t ldy, int n_threads) {
    /* w: (rows, row_bytes) stored rows; x: (n_tok, ldx) f32, ldx >= cols; y: (n_tok, ldy) f32, ldy >= rows */
    const struct type_info *ti = check(type, row_bytes, rows, cols);
    if (!ti || n_tok < 0 || (n_tok > 0 && (ldx < cols || ldy < rows))) return -1;
    if (rows == 0 || n_tok == 0) return 0;
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
