#version 450
// Causal grouped-query attention of T queries (rows t0..t0+T-1 of q, pos and o) over one sequence's
// cache: query t (at position pos[t]) attends to
// cache rows 0..pos[t] (pos[t] - window + 1..pos[t] with a window); head h reads kv head h / (n_heads /
// n_kv_heads); scores scaled by `scale`, then soft-capped where softcap > 0. ring > 0: the cache is a ring
// of `ring` rows (a sliding-window layer's), position j at row j % ring; positions are not bounded by n_ctx.
// One workgroup per (head, token): it walks the rows in chunks of WG (one row per invocation for the
// scores), keeps a running max and sum (online softmax), and each invocation accumulates the output
// dims d = lid, lid + WG, ... Grid: x = n_heads, y = T.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint HD = 128;               // head_dim (multiple of 4)
const uint ACC = (HD + gl_WorkGroupSize.x - 1) / gl_WorkGroupSize.x;
#include "common/reduce.glsl"

layout(binding = 0) readonly buffer QB { float q[]; };     // (T, q_stride) f32
#ifdef KV_F16
layout(binding = 1) readonly buffer KC { uvec2 kc[]; };    // (n_ctx, kv_dim) f16, 4 per uvec2
layout(binding = 2) readonly buffer VC { uint vc[]; };     // (n_ctx, kv_dim) f16, 2 per uint
#else
layout(binding = 1) readonly buffer KC { vec4 kc[]; };     // (n_ctx, kv_dim) f32
layout(binding = 2) readonly buffer VC { float vc[]; };    // (n_ctx, kv_dim) f32
#endif
layout(binding = 3) readonly buffer PB { uint pos[]; };    // (T) positions
layout(binding = 4) writeonly buffer OB { float o[]; };    // (T, o_stride) f32

layout(push_constant) uniform PC {
    uint T;
    uint n_heads;
    uint n_kv_heads;
    uint n_ctx;
    uint q_stride;
    uint o_stride;
    float scale;
    uint t0;        // first token row (several sequences share the batch buffers)
    uint window;    // > 0: query at position p sees rows p - window + 1 .. p only (sliding-window layers)
    float softcap;  // > 0: scores s become softcap * tanh(s / softcap) (gemma2)
    uint ring;      // > 0: rows in the ring cache (row = position % ring); 0: row = position < n_ctx
} pc;

shared vec4 qs[HD / 4];
shared float ps[gl_WorkGroupSize.x];

vec4 k4(uint row, uint i) {                 // keys row `row`, floats 4i..4i+3 from the head base
#ifdef KV_F16
    uvec2 a = kc[row * ((pc.n_kv_heads * HD) >> 2) + i];
    return vec4(unpackHalf2x16(a.x), unpackHalf2x16(a.y));
#else
    return kc[row * ((pc.n_kv_heads * HD) >> 2) + i];
#endif
}

float v1(uint e) {                          // values element e of the flat cache
#ifdef KV_F16
    return unpackHalf2x16(vc[e >> 1])[e & 1u];
#else
    return vc[e];
#endif
}

void main() {
    uint h = gl_WorkGroupID.x, t = gl_WorkGroupID.y + pc.t0, lid = gl_LocalInvocationID.x;
    const uint WG = gl_WorkGroupSize.x;
    uint kvh = h / (pc.n_heads / pc.n_kv_heads);
    uint kv_dim = pc.n_kv_heads * HD;
    for (uint i = lid; i < HD / 4; i += WG) {
        uint b = t * pc.q_stride + h * HD + 4 * i;
        qs[i] = vec4(q[b], q[b + 1], q[b + 2], q[b + 3]) * pc.scale;
    }
    barrier();
    uint L = pc.ring > 0u ? pos[t] + 1u : min(pos[t] + 1u, pc.n_ctx);   // positions LO..L-1 are seen
    uint LO = pc.window > 0u && L > pc.window ? L - pc.window : 0u;
    uint kb = (kvh * HD) >> 2;               // head offset in vec4s
    float m = -1.0 / 0.0, l = 0.0;
    float acc[ACC];
    for (uint a = 0; a < ACC; a++) acc[a] = 0.0;

    for (uint c = LO; c < L; c += WG) {
        uint j = c + lid;
        float s = -1.0 / 0.0;
        if (j < L) {
            s = 0.0;
            uint row = pc.ring > 0u ? j % pc.ring : j;
            for (uint i = 0; i < HD / 4; i++) s += dot(qs[i], k4(row, kb + i));
            if (pc.softcap > 0.0) s = pc.softcap * tanh(clamp(s / pc.softcap, -15.0, 15.0));
        }
        float mn = max(m, wg_max(s));
        float p = j < L ? exp(s - mn) : 0.0;
        float alpha = exp(m - mn);
        ps[lid] = p;
        barrier();
        l = l * alpha + wg_sum(p);
        uint n = min(WG, L - c);
        for (uint a = 0; a < ACC; a++) {
            uint d = lid + a * WG;
            if (d >= HD) break;
            float s2 = acc[a] * alpha;
            if (pc.ring == 0u) {
                uint e = c * kv_dim + kvh * HD + d;
                for (uint r = 0; r < n; r++) s2 += ps[r] * v1(e + r * kv_dim);
            } else {
                for (uint r = 0; r < n; r++) s2 += ps[r] * v1((c + r) % pc.ring * kv_dim + kvh * HD + d);
            }
            acc[a] = s2;
        }
        m = mn;
        barrier();                           // ps is rewritten by the next chunk
    }
    for (uint a = 0; a < ACC; a++) {
        uint d = lid + a * WG;
        if (d < HD) o[t * pc.o_stride + h * HD + d] = acc[a] / l;
    }
}
