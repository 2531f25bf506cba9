/* vkpack native kernels: the prefill ops between the products, on the kernels' own OpenMP threads.
 * Included once, by kernels.c, after gemm.h (it uses tr16); not a header for anything else.
 *
 * Why: at 512 tokens the numpy reference's causal attention (one BLAS thread, a [heads, T, T] score
 * array passed over six times) and SwiGLU (six passes over [T, ffn]) took 54 + 9 ms a layer of a
 * 2048-wide model on the 2-core VM: ~0.9 s of a ~5 s prefill, on one core (numpy's BLAS stays on one
 * thread in the native backend: its spinning threads would steal the kernels' cores). Here attention
 * runs per (query head, 16 queries): scores against keys transposed once per call, a row softmax,
 * then P V, with nothing wider than a [16, keys] row block in memory; both cores share the work.
 * Numerics: f32 throughout, the reference's formulas and order of roundings (q * scale, then dots;
 * exp(s - max) / sum; g / (1 + exp(-g)) * u) with exp by a polynomial within 2 ulp of libm's;
 * only the summation order differs (tests/test_native_kernels.py bounds it).
 * AVX-512 only: other builds return -2 and the caller keeps the numpy reference.
 */
#if defined(VKP_AVX512)
#define AQ 16    /* queries per work item (rows of the score block) */
#define AK 64    /* keys per score tile: 4 vectors */

/* e^x, Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial, then 2^n by vscalefps
 * (0 below e^-104, inf above e^89, like expf). Within 2 ulp. */
INLINE __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

INLINE __mmask16 first_n(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* s[r][j] = qs[r] . key j for 4 rows and the AK keys at kt (kt: (hd, ldk) keys transposed). */
INLINE void attn_scores(const float *restrict qs, int hd, const float *restrict kt, int64_t ldk, float *restrict s,
                        int64_t lds) {
    /* qs: (4, hd) scaled queries; s: (4, lds) scores */
    __m512 acc[4][4];
    UNROLL for (int r = 0; r < 4; r++) UNROLL for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
    for (int d = 0; d < hd; d++) {
        __m512 kv[4];
        UNROLL for (int v = 0; v < 4; v++) kv[v] = _mm512_loadu_ps(kt + d * ldk + 16 * v);
        UNROLL for (int r = 0; r < 4; r++) {
            const __m512 b = _mm512_set1_ps(qs[r * hd + d]);
            UNROLL for (int v = 0; v < 4; v++) acc[r][v] = _mm512_fmadd_ps(b, kv[v], acc[r][v]);
        }
    }
    UNROLL for (int r = 0; r < 4; r++) UNROLL for (int v = 0; v < 4; v++) _mm512_storeu_ps(s + r * lds + 16 * v, acc[r][v]);
}

/* Row r of the scores -> probabilities over its first n keys; zeros up to npad. */
INLINE void attn_softmax(float *s, int64_t n, int64_t npad) {
    __m512 m = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < n; j += 16) m = _mm512_mask_max_ps(m, first_n(n - j), m, _mm512_loadu_ps(s + j));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = first_n(n - j);
        const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx)));
        sum = _mm512_add_ps(sum, e);
        _mm512_storeu_ps(s + j, e);
    }
    const __m512 tot = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    int64_t j = 0;
    for (; j < n; j += 16) _mm512_storeu_ps(s + j, _mm512_div_ps(_mm512_loadu_ps(s + j), tot));
    for (; j < npad; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
}

/* o[r] += sum_j p[r][j] * v[j] for 4 rows, keys [0, n), 4 vectors (64 dims) of each value row. */
INLINE void attn_pv(const float *restrict p, int64_t ldp, int64_t n, const float *restrict v, int64_t ldv, int nv,
                    float *restrict o, int64_t ldo) {
    /* p: (4, ldp) probabilities; v: (n, ldv) value rows from this head's dim; o: (4, ldo) */
    __m512 acc[4][4];
    UNROLL for (int r = 0; r < 4; r++) UNROLL for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 vv[4];
        UNROLL for (int c = 0; c < 4; c++) vv[c] = c < nv ? _mm512_loadu_ps(v + j * ldv + 16 * c) : _mm512_setzero_ps();
        UNROLL for (int r = 0; r < 4; r++) {
            const __m512 b = _mm512_set1_ps(p[r * ldp + j]);
            UNROLL for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(b, vv[c], acc[r][c]);
        }
    }
    UNROLL for (int r = 0; r < 4; r++) for (int c = 0; c < nv; c++) _mm512_storeu_ps(o + r * ldo + 16 * c, acc[r][c]);
}

/* One work item: query head hq, queries [i0, i0 + nq). kt: this kv head's keys transposed (hd, ldk). */
static void attn_item(const float *q, int64_t ldq, int64_t i0, int nq, int64_t pos0, int hq, int hk, int hd,
                      float scale, const float *kt, int64_t ldk, const float *vc, int64_t ldkv, float *out,
                      int64_t ldo, float *qs, float *s, float *ob) {
    /* qs: (AQ, hd); s: (AQ, ldk) scores then probabilities; ob: (AQ, hd) outputs */
    const int64_t nk = pos0 + i0 + nq, nk_pad = (nk + AK - 1) / AK * AK;     /* keys any row of the item sees */
    for (int r = 0; r < AQ; r++)
        for (int d = 0; d < hd; d++) qs[r * hd + d] = r < nq ? q[(i0 + r) * ldq + hq * hd + d] * scale : 0.0f;
    for (int r = 0; r < AQ; r += 4)
        for (int64_t j = 0; j < nk_pad; j += AK) attn_scores(qs + r * hd, hd, kt + j, ldk, s + r * ldk + j, ldk);
    for (int r = 0; r < nq; r++) attn_softmax(s + r * ldk, pos0 + i0 + r + 1, nk_pad);
    for (int r = nq; r < AQ; r++) memset(s + r * ldk, 0, sizeof(float) * (size_t)nk_pad);
    for (int r = 0; r < nq; r += 4) {
        const int64_t n = pos0 + i0 + (r + 4 < nq ? r + 4 : nq);            /* the last of these rows' keys */
        for (int c = 0; c < hd; c += 64)
            attn_pv(s + r * ldk, ldk, n, vc + hk * hd + c, ldkv, (hd - c) / 16 < 4 ? (hd - c) / 16 : 4,
                    ob + r * hd + c, hd);
    }
    for (int r = 0; r < nq; r++) memcpy(out + (i0 + r) * ldo + hq * hd, ob + r * hd, sizeof(float) * (size_t)hd);
}
#endif

/* Causal grouped-query attention of n_tok queries at positions pos0.. over cache rows [0, pos0 + n_tok):
 * out[t, h*hd:(h+1)*hd] = softmax((q[t, head h] * scale) . K[:pos0+t+1]) V, kv head h / (n_heads / n_kv).
 * Returns 0, -1 for bad arguments, -2 where this build has no such kernel (non-AVX-512, hd % 16). */
int vkp_attention(const float *q, int64_t ldq, int64_t n_tok, const float *kc, const float *vc, int64_t ldkv,
                  int64_t pos0, int n_heads, int n_kv, int hd, float scale, float *out, int64_t ldo, int n_threads) {
    /* q: (n_tok, ldq); kc, vc: (pos0 + n_tok, ldkv) caches; out: (n_tok, ldo) */
    if (n_tok < 0 || pos0 < 0 || n_heads < 1 || n_kv < 1 || n_heads % n_kv || hd < 1 || ldq < (int64_t)n_heads * hd ||
        ldkv < (int64_t)n_kv * hd || ldo < (int64_t)n_heads * hd)
        return -1;
#if defined(VKP_AVX512)
    if (hd % 16) return -2;
    if (n_tok == 0) return 0;
    const int64_t n = pos0 + n_tok, ldk = (n + AK - 1) / AK * AK + 16;     /* +16: kt rows off 4 KiB strides */
    const int64_t blocks = (n_tok + AQ - 1) / AQ, items = blocks * n_heads, per = AQ * (2 * hd + ldk);
    const int nth = n_threads < 1 ? 1 : n_threads > items ? (int)items : n_threads;
    float *kt = aligned_alloc(64, (size_t)(n_kv * hd * ldk * 4)), *buf = aligned_alloc(64, (size_t)(nth * per * 4));
    if (!kt || !buf) {
        free(kt), free(buf);
        return -2;
    }
    /* keys transposed, kt[h][d][j], 16 x 16 at a time; zeros past n */
#pragma omp parallel for collapse(2) schedule(static) num_threads(nth) if (nth > 1)
    for (int h = 0; h < n_kv; h++)
        for (int64_t j0 = 0; j0 < ldk; j0 += 16) {
            for (int d0 = 0; d0 < hd; d0 += 16) {
                __m512 r[16];
                UNROLL for (int i = 0; i < 16; i++)
                    r[i] = j0 + i < n ? _mm512_loadu_ps(kc + (j0 + i) * ldkv + h * hd + d0) : _mm512_setzero_ps();
                tr16(r);
                UNROLL for (int i = 0; i < 16; i++) _mm512_storeu_ps(kt + ((int64_t)h * hd + d0 + i) * ldk + j0, r[i]);
            }
        }
    const int group = n_heads / n_kv;
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        float *b = buf + (int64_t)omp_get_thread_num() * per;
        /* later query blocks see more keys: items in dynamic order, the costliest first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t blk = blocks - 1 - it / n_heads;
            const int hq = (int)(it % n_heads), hk = hq / group;
            const int nq = n_tok - blk * AQ < AQ ? (int)(n_tok - blk * AQ) : AQ;
            attn_item(q, ldq, blk * AQ, nq, pos0, hq, hk, hd, scale, kt + (int64_t)hk * hd * ldk, ldk, vc, ldkv,
                      out, ldo, b, b + AQ * hd, b + AQ * hd + AQ * ldk);
        }
    }
    free(kt), free(buf);
    return 0;
#else
    (void)q, (void)kc, (void)vc, (void)scale, (void)out, (void)n_threads;
    return -2;
#endif
}

/* out = g / (1 + exp(-g)) * u (SwiGLU), exp's argument clipped to [-80, 80] as the reference does.
 * Returns 0, or -2 where this build has no such kernel. */
int vkp_swiglu(const float *g, const float *u, float *out, int64_t n, int n_threads) {
    /* g, u, out: (n,) */
#if defined(VKP_AVX512)
    const int64_t chunks = (n + 4095) / 4096;
    const int nth = n_threads < 1 ? 1 : n_threads;
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t e = (c + 1) * 4096 < n ? (c + 1) * 4096 : n;
        for (int64_t i = c * 4096; i < e; i += 16) {
            const __mmask16 k = first_n(e - i);
            const __m512 gv = _mm512_maskz_loadu_ps(k, g + i), uv = _mm512_maskz_loadu_ps(k, u + i);
            const __m512 ng = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(-80.0f)),
                                            _mm512_set1_ps(80.0f));
            const __m512 den = _mm512_add_ps(exp512(ng), _mm512_set1_ps(1.0f));
            _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(_mm512_div_ps(gv, den), uv));
        }
    }
    return 0;
#else
    (void)g, (void)u, (void)out, (void)n, (void)n_threads;
    return -2;
#endif
}
