/* vkpack native kernels: one step of a decode pass (a layer's attention block, or its MLP) in one call.
 * Included once, by kernels.c, after experts.h; not a header for anything else.
 *
 * Why: decoding op by op goes back to Python ~10 times a step, for a norm, a rope, an attention of one
 * query, an add: ~30 % of SmolLM2's decode token on the 2-core VM was spent outside the products
 * (numpy ops of 5-100 us, ~20 us of Python and checks around each product), and every product started
 * the OpenMP threads anew. Here runtime/native/program.py writes a step as a list of instructions and
 * one parallel region runs them all: instructions between two `sync` marks share one pass of the
 * threads (q, k and v: one pass over their rows together), each `sync` is one barrier.
 * Numerics: products as vkp_matmul computes them (the same row kernels); the other ops with the numpy
 * reference's formulas and f32 roundings (runtime/cpu/ops.py); sums in another order, so results agree
 * within a few f32 ulps, not bit for bit (tests/test_native_program.py bounds them).
 * The caller (program.py) checks every array it names; C checks the sizes it can (types, row lengths).
 */
enum { P_NORM = 1, P_MATMUL = 2, P_ROPE = 3, P_KV_STORE = 4, P_ATTN = 5, P_ADD = 6, P_SWIGLU = 7 };

/* One instruction; its fields mean, per op (x, y: f32 activations, rows of `ld` floats):
 *   P_NORM     p: x, w (f32), y        n: tokens, width, group, ldx, ldy, whole (1: one group per row)
 *              f: eps, offset          y = x / sqrt(mean(x^2) + eps) * (w + offset), per group of a row
 *   P_MATMUL   p: w (stored), x, y, bias or 0      n: type, row_bytes, rows, cols, ldx, ldy, tokens
 *              y[t][r] = row r . x[t] (+ bias[r])
 *   P_ROPE     p: x, cos, sin          n: tokens, heads, head_dim, rope_dim, mode (0 norm, 1 neox), ldx
 *              in place; cos and sin: (tokens, rope_dim / 2)
 *   P_KV_STORE p: k, v, k cache, v cache           n: tokens, pos0, width, ldk (of k and v), ld of the caches
 *              cache rows pos0.. = the tokens' k and v rows
 *   P_ATTN     p: q, k cache, v cache, out         n: tokens, pos0, heads, kv heads, head_dim, ldq, ld of the
 *              caches, ldo   f: scale    causal: token t sees cache rows [0, pos0 + t]
 *   P_ADD      p: a, b, y              n: count          y = a + b
 *   P_SWIGLU   p: g, u, y              n: count          y = g / (1 + exp(-g)) * u, -g clipped to +-80
 */
struct vkp_ins {
    int64_t op, sync;   /* sync: wait for every instruction before this one */
    const void *p[6];
    int64_t n[8];
    double f[2];
};

#define P_CHUNK 1024   /* elements of an add or a SwiGLU per work item */

/* Rows per work item of a matmul (items are whole multiples of RMAX but the last). */
static int64_t p_rows_per(const struct vkp_ins *in, int nth) {
    const int64_t ch = (in->n[2] + 4 * nth - 1) / (4 * nth);
    return (ch + RMAX - 1) / RMAX * RMAX;
}

/* Work items of an instruction (a matmul: chunks of rows; attention: (head, token) pairs). */
static int64_t p_items(const struct vkp_ins *in, int nth) {
    const int64_t *n = in->n;
    switch (in->op) {
        case P_NORM: return n[0] * (n[1] / n[2]);
        case P_MATMUL: {
            const int64_t per = p_rows_per(in, nth);
            return (n[2] + per - 1) / per;
        }
        case P_ROPE: return n[0] * n[1];
        case P_KV_STORE: return n[0];
        case P_ATTN: return n[0] * n[2];
        case P_ADD: case P_SWIGLU: return (n[0] + P_CHUNK - 1) / P_CHUNK;
        default: return -1;
    }
}

static int p_check(const struct vkp_ins *in) {
    const int64_t *n = in->n;
    for (int i = 0; i < 8; i++)
        if (n[i] < 0) return 0;
    switch (in->op) {
        case P_NORM: return n[2] > 0 && n[1] % n[2] == 0 && n[3] >= n[1] && n[4] >= n[1];
        case P_MATMUL: return check((int)n[0], n[1], n[2], n[3]) && n[4] >= n[3] && n[5] >= n[2] && n[6] < GEMM_MIN_TOKENS;
        case P_ROPE: return n[3] % 2 == 0 && n[3] <= n[2] && n[4] <= 1 && n[5] >= n[1] * n[2];
        case P_KV_STORE: return n[3] >= n[2] && n[4] >= n[2];
        case P_ATTN:
            return n[2] > 0 && n[3] > 0 && n[2] % n[3] == 0 && n[4] > 0 && n[5] >= n[2] * n[4] && n[6] >= n[3] * n[4] &&
                   n[7] >= n[2] * n[4];
        case P_ADD: case P_SWIGLU: return 1;
        default: return 0;
    }
}

/* A matmul's prepared x (fast512.h), set up once per call. */
struct p_mm {
#if defined(VKP_AVX512)
    const struct fast_info *fi;
    float *p;
    int64_t ldp, nb;
#endif
    const struct type_info *ti;
    int64_t rows_per;
};

static void p_norm(const struct vkp_ins *in, int64_t item) {
    const int64_t *n = in->n;
    const int64_t g = n[2], per_row = n[1] / g, t = item / per_row, k = item % per_row;
    const float *x = (const float *)in->p[0] + t * n[3] + k * g, *w = (const float *)in->p[1];
    float *y = (float *)in->p[2] + t * n[4] + k * g;
    const float eps = (float)in->f[0], off = (float)in->f[1];
    vf acc = vf_zero();
    int64_t i = 0;
    for (; i + VL <= g; i += VL) {
        const vf v = vf_load(x + i);
        acc = vf_fma(v, v, acc);
    }
    float ss = vf_sum(acc);
    for (; i < g; i++) ss = FMA_F32(x[i], x[i], ss);
    if (n[5]) {   /* a whole row: x * (1 / sqrt(ss / n + eps)) * w, as the reference's decode form */
        const float r = 1.0f / sqrtf(ss / (float)g + eps);
        for (i = 0; i < g; i++) y[i] = x[i] * r * (w[i] + off);
    } else {      /* groups: x / sqrt(ss * (1 / g) + eps) * w[:g] */
        const float d = sqrtf(ss * (1.0f / (float)g) + eps);
        for (i = 0; i < g; i++) y[i] = x[i] / d * (w[i] + off);
    }
}

static void p_rope(const struct vkp_ins *in, int64_t item) {
    const int64_t *n = in->n;
    const int64_t t = item / n[1], h = item % n[1], half = n[3] / 2;
    float *x = (float *)in->p[0] + t * n[5] + h * n[2];
    const float *c = (const float *)in->p[1] + t * half, *s = (const float *)in->p[2] + t * half;
    for (int64_t i = 0; i < half; i++) {
        float *a = n[4] ? x + i : x + 2 * i, *b = n[4] ? x + half + i : x + 2 * i + 1;
        const float av = *a, bv = *b;
        *a = av * c[i] - bv * s[i];
        *b = av * s[i] + bv * c[i];
    }
}

static void p_kv_store(const struct vkp_ins *in, int64_t t) {
    const int64_t *n = in->n;
    const size_t bytes = sizeof(float) * (size_t)n[2];
    memcpy((float *)in->p[2] + (n[1] + t) * n[4], (const float *)in->p[0] + t * n[3], bytes);
    memcpy((float *)in->p[3] + (n[1] + t) * n[4], (const float *)in->p[1] + t * n[3], bytes);
}

/* exp of each of s[0..n) in place; returns their sum (f32, in order of the vectors). */
static float p_exp_sum(float *s, int64_t n, float mx) {
#if defined(VKP_AVX512)
    __m512 sum = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(mx);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = first_n(n - j);
        const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), m)));
        sum = _mm512_add_ps(sum, e);
        _mm512_mask_storeu_ps(s + j, k, e);
    }
    return _mm512_reduce_add_ps(sum);
#else
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    return sum;
#endif
}

/* One query head h of token t: softmax((q * scale) . K[:pos0 + t + 1]) V. s: scratch of pos0 + t + 1 floats. */
static void p_attn(const struct vkp_ins *in, int64_t item, float *s) {
    const int64_t *n = in->n;
    const int64_t t = item / n[2], h = item % n[2], hd = n[4], hk = h / (n[2] / n[3]), nk = n[1] + t + 1, ldkv = n[6];
    const float *q = (const float *)in->p[0] + t * n[5] + h * hd;
    const float *kc = (const float *)in->p[1] + hk * hd, *vc = (const float *)in->p[2] + hk * hd;
    float *o = (float *)in->p[3] + t * n[7] + h * hd;
    const float scale = (float)in->f[0];
    float qs[512];
    for (int64_t d = 0; d < hd; d++) qs[d] = q[d] * scale;
    float mx = -__builtin_inff();
    for (int64_t j = 0; j < nk; j++) {
        const float *k = kc + j * ldkv;
        vf acc = vf_zero();
        int64_t d = 0;
        for (; d + VL <= hd; d += VL) acc = vf_fma(vf_load(qs + d), vf_load(k + d), acc);
        float dot = vf_sum(acc);
        for (; d < hd; d++) dot = FMA_F32(qs[d], k[d], dot);
        s[j] = dot;
        mx = dot > mx ? dot : mx;
    }
    const float sum = p_exp_sum(s, nk, mx);
    for (int64_t j = 0; j < nk; j++) s[j] /= sum;
    int64_t d = 0;
    for (; d + VL <= hd; d += VL) {
        vf acc = vf_zero();
        for (int64_t j = 0; j < nk; j++) acc = vf_fma(vf_set1(s[j]), vf_load(vc + j * ldkv + d), acc);
        vf_store(o + d, acc);
    }
    for (; d < hd; d++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < nk; j++) acc = FMA_F32(s[j], vc[j * ldkv + d], acc);
        o[d] = acc;
    }
}

static void p_elementwise(const struct vkp_ins *in, int64_t item) {
    const int64_t i0 = item * P_CHUNK, i1 = i0 + P_CHUNK < in->n[0] ? i0 + P_CHUNK : in->n[0];
    const float *a = (const float *)in->p[0], *b = (const float *)in->p[1];
    float *y = (float *)in->p[2];
    if (in->op == P_ADD) {
        for (int64_t i = i0; i < i1; i++) y[i] = a[i] + b[i];
        return;
    }
    for (int64_t i = i0; i < i1; i++) {
        float c = -a[i];
        c = c < -80.0f ? -80.0f : c > 80.0f ? 80.0f : c;
        y[i] = a[i] / (expf(c) + 1.0f) * b[i];
    }
}

static void p_matmul(const struct vkp_ins *in, const struct p_mm *m, int64_t item) {
    const int64_t *n = in->n;
    const int64_t r0 = item * m->rows_per, r1 = r0 + m->rows_per < n[2] ? r0 + m->rows_per : n[2];
    const uint8_t *w = in->p[0];
    float *y = (float *)in->p[2];
#if defined(VKP_AVX512)
    if (m->fi) {
        const struct px_job j = {w, n[1], m->nb, in->p[1], n[4], m->p ? m->p : (const float *)in->p[1], m->ldp, n[6], y, n[5]};
        m->fi->mm(&j, r0, r1);
    } else
#endif
    {
        const struct mm_job j = {w, n[1], n[3], in->p[1], n[4], n[6], y, n[5]};
        m->ti->mm(&j, r0, r1);
    }
    const float *b = in->p[3];
    if (b)
        for (int64_t t = 0; t < n[6]; t++)
            for (int64_t r = r0; r < r1; r++) y[t * n[5] + r] += b[r];
}

/* Runs the n_ins instructions in order on n_threads threads. Returns 0, -1 for an instruction that
 * fails its checks (nothing run), -3 when scratch memory cannot be had. */
int vkp_program(const struct vkp_ins *ins, int64_t n_ins, int n_threads) {
    if (n_ins < 0) return -1;
    const int nth = n_threads < 1 ? 1 : n_threads;
    int64_t *start = malloc(sizeof(int64_t) * (size_t)(n_ins + 1));   /* first item of each instruction */
    struct p_mm *mm = malloc(sizeof(struct p_mm) * (size_t)(n_ins + 1));
    if (!start || !mm) {
        free(start), free(mm);
        return -3;
    }
    int64_t prep_floats = 0, keys = 0;
    start[0] = 0;
    for (int64_t i = 0; i < n_ins; i++) {
        const struct vkp_ins *in = &ins[i];
        if (!p_check(in)) {
            free(start), free(mm);
            return -1;
        }
        start[i + 1] = start[i] + p_items(in, nth);
        if (in->op == P_ATTN && in->n[1] + in->n[0] > keys) keys = in->n[1] + in->n[0];
        if (in->op == P_ATTN && in->n[4] > 512) {
            free(start), free(mm);
            return -1;
        }
        if (in->op == P_MATMUL) {
            mm[i].ti = type_info((int)in->n[0]);
            mm[i].rows_per = p_rows_per(in, nth);
#if defined(VKP_AVX512)
            mm[i].fi = fast_info((int)in->n[0]);
            if (mm[i].fi && in->n[6] > mm[i].fi->max_tok) mm[i].fi = 0;
            mm[i].nb = mm[i].fi ? in->n[3] / mm[i].ti->qk : 0;
            mm[i].ldp = mm[i].fi ? mm[i].fi->ldp(mm[i].nb) : 0;
            mm[i].p = 0;
            prep_floats += in->n[6] * mm[i].ldp;
#endif
        }
    }
    const int64_t per_thread = (keys + 15) / 16 * 16 + 16;
    float *buf = aligned_alloc(64, (size_t)(((prep_floats + nth * per_thread) * 4 + 63) / 64 * 64));
    if (!buf) {
        free(start), free(mm);
        return -3;
    }
#if defined(VKP_AVX512)
    float *pb = buf + nth * per_thread;
    for (int64_t i = 0; i < n_ins; i++)
        if (ins[i].op == P_MATMUL && mm[i].ldp) {
            mm[i].p = pb;
            pb += ins[i].n[6] * mm[i].ldp;
        }
#endif
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        float *scratch = buf + (int64_t)omp_get_thread_num() * per_thread;
        for (int64_t g0 = 0; g0 < n_ins;) {
            int64_t g1 = g0 + 1;
            while (g1 < n_ins && !ins[g1].sync) g1++;
#if defined(VKP_AVX512)
            /* the group's products' x, prepared for fast512.h: (instruction, token) items */
            int has_prep = 0;
            for (int64_t i = g0; i < g1; i++) has_prep |= ins[i].op == P_MATMUL && mm[i].p != 0;
            if (has_prep) {
#pragma omp for schedule(static)
                for (int64_t k = 0; k < (g1 - g0) * GEMM_MIN_TOKENS; k++) {
                    const int64_t i = g0 + k / GEMM_MIN_TOKENS, t = k % GEMM_MIN_TOKENS;
                    if (ins[i].op == P_MATMUL && mm[i].p && t < ins[i].n[6])
                        mm[i].fi->px((const float *)ins[i].p[1] + t * ins[i].n[4], mm[i].nb, mm[i].p + t * mm[i].ldp);
                }
            }
#endif
#pragma omp for schedule(dynamic, 1)
            for (int64_t k = start[g0]; k < start[g1]; k++) {
                int64_t i = g0;
                while (start[i + 1] <= k) i++;
                const struct vkp_ins *in = &ins[i];
                const int64_t item = k - start[i];
                switch (in->op) {
                    case P_NORM: p_norm(in, item); break;
                    case P_MATMUL: p_matmul(in, &mm[i], item); break;
                    case P_ROPE: p_rope(in, item); break;
                    case P_KV_STORE: p_kv_store(in, item); break;
                    case P_ATTN: p_attn(in, item, scratch); break;
                    default: p_elementwise(in, item); break;
                }
            }
            g0 = g1;
        }
    }
    free(buf), free(start), free(mm);
    return 0;
}
