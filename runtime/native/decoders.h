/* vkpack native kernels: the weight formats. Included once, by kernels.c, after its ISA selection and
 * vector macros (vf, vi, VL, GV, GROUP, INLINE, UNROLL); not a header for anything else.
 *
 * For each type: dec32_<type> (plain C, ggml's reference arithmetic; the portable path), prep_<type> (a
 * K-block's scales, once per block), decv_<type> (the SIMD decoder of one group into registers) and,
 * for float types, el_<type> (one element of a row's tail). All are bit-equal to ggml's
 * dequantize_row_<type>: tests/test_native_kernels.py compares every type's bits with the numpy reference.
 */
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

/* IQ4_NL/IQ4_XS: ggml's kvalues_iq4nl (int8 there; as floats they are exact, and d * kv is the same product). */
static const float kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* IQ4_XS: six-bit scale s (0..7), minus 32, of the block at b. */
INLINE int scale_iq4_xs(int s, const uint8_t *b) {
    return (int)(((b[4 + s / 2] >> (4 * (s % 2))) & 15) | (((rd16(b + 2) >> (2 * s)) & 3) << 4)) - 32;
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
 * Non-linear 4-bit (values from the 16-entry table kvalues_iq4nl; a byte's nibbles as in Q4_0):
 *   IQ4_NL (18 B, 32 elements): f16 d, u8 qs[16];  x = d * kv[q]
 *   IQ4_XS (136 B, 256 elements): f16 d, u16 scales_h, u8 scales_l[4], u8 qs[128]; group s: qs[16s ..],
 *     ls = (scales_l[s/2] >> 4(s%2)) & 15 | ((scales_h >> 2s) & 3) << 4; x = (d * (ls - 32)) * kv[q]
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

INLINE void dec32_iq4_nl(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 18 * g, *qs = b + 2;
    const float d = rdh(b);
    for (int j = 0; j < 16; j++) o[j] = d * kvalues_iq4nl[qs[j] & 15];
    for (int j = 0; j < 16; j++) o[j + 16] = d * kvalues_iq4nl[qs[j] >> 4];
}

INLINE void dec32_iq4_xs(const uint8_t *restrict r, int64_t g, float *restrict o) {
    const uint8_t *b = r + 136 * (g >> 3);
    const int s = (int)(g & 7);
    const uint8_t *qs = b + 8 + 16 * s;
    const float dl = rdh(b) * (float)scale_iq4_xs(s, b);
    for (int j = 0; j < 16; j++) o[j] = dl * kvalues_iq4nl[qs[j] & 15];
    for (int j = 0; j < 16; j++) o[j + 16] = dl * kvalues_iq4nl[qs[j] >> 4];
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

INLINE void prep_iq4_xs(const uint8_t *r, int64_t blk, struct kscales *k) {
    const uint8_t *b = r + 136 * blk;
    const float d = rdh(b);
    for (int s = 0; s < 8; s++) k->a[s] = d * (float)scale_iq4_xs(s, b);
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

/* IQ4: the table times the scale, then one vpermps per 16 nibbles (as Q4_0). */
INLINE void iq4_lookup(const uint8_t *qs, float scale, vf *w) {
    const vf t = vf_mul(vf_load(kvalues_iq4nl), vf_set1(scale));
    const vi q = vi_u8(qs);
    w[0] = _mm512_permutexvar_ps(q, t);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
}

DECV(iq4_nl) {
    (void)k;
    iq4_lookup(r + 18 * g + 2, rdh(r + 18 * g), w);
}

DECV(iq4_xs) { iq4_lookup(r + 136 * (g >> 3) + 8 + 16 * (g & 7), k->a[g & 7], w); }

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

/* IQ4: the 16 table products in two registers; vpermps picks by the low 3 bits, bit 3 picks the register. */
INLINE void iq4_lookup(const uint8_t *qs, float scale, vf *w) {
    const vf lo = vf_mul(vf_load(kvalues_iq4nl), vf_set1(scale)), hi = vf_mul(vf_load(kvalues_iq4nl + 8), vf_set1(scale));
    UNROLL for (int v = 0; v < GV; v++) {
        const vi q = nibbles(qs, VL * v);
        w[v] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, q), _mm256_permutevar8x32_ps(hi, q),
                                _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
    }
}

DECV(iq4_nl) {
    (void)k;
    iq4_lookup(r + 18 * g + 2, rdh(r + 18 * g), w);
}

DECV(iq4_xs) { iq4_lookup(r + 136 * (g >> 3) + 8 + 16 * (g & 7), k->a[g & 7], w); }
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
PORTABLE_DECV(q4_k) PORTABLE_DECV(q5_k) PORTABLE_DECV(q6_k) PORTABLE_DECV(iq4_nl) PORTABLE_DECV(iq4_xs)
#endif

/* Elements past the last whole group: float types only (a quantized row is whole groups). */
INLINE float el_f32(const uint8_t *r, int64_t i) { return f32_bits(rd32(r + 4 * i)); }
INLINE float el_f16(const uint8_t *r, int64_t i) { return rdh(r + 2 * i); }
INLINE float el_bf16(const uint8_t *r, int64_t i) { return f32_bits((uint32_t)rd16(r + 2 * i) << 16); }
INLINE float el_none(const uint8_t *r, int64_t i) { (void)r; (void)i; return 0.0f; }

