#version 450
// Split-K attention, pass 2 of 2: combine the partials of attention_split.comp for each (head, token):
// out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M = max_s m_s, over the splits that hold
// rows (the same R as pass 1, from pos[t]; a ring cache, rows >= window, needs nothing more: its live
// rows are min(pos[t] + 1, window) either way). Invocations over (split group, head_dim unit); partials
// are loaded 8 at a time (L2 latency, not bandwidth, bounds this pass). Grid: x = n_heads, y = T.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint HD = 128;   // head_dim (multiple of 4)
const uint WG = gl_WorkGroupSize.x;
const uint VU = HD / 4;
const uint RG = WG >= VU ? WG / VU : 1;        // split groups
const uint UPI = WG >= VU ? 1 : (VU + WG - 1) / WG;
const uint SB = (8 + UPI - 1) / UPI;           // partials loaded at once
#include "common/reduce.glsl"

layout(binding = 0) readonly buffer PA { vec4 pacc[]; };   // (T, n_heads, n_splits, HD)
layout(binding = 1) readonly buffer PM { vec2 pml[]; };    // (T, n_heads, n_splits) (m, l)
layout(binding = 2) readonly buffer PB { uint pos[]; };    // (T) positions
layout(binding = 3) writeonly buffer OB { float o[]; };    // (T, o_stride) f32

layout(push_constant) uniform PC {
    uint T;
    uint n_heads;
    uint n_ctx;
    uint o_stride;
    uint t0;
    uint rows;
    uint n_splits;
    uint window;    // as in pass 1: > 0 keeps only the last `window` rows
} pc;

shared vec4 racc[RG > 1 ? RG * VU : 1];

void main() {
    uint h = gl_WorkGroupID.x, tl = gl_WorkGroupID.y, t = tl + pc.t0, lid = gl_LocalInvocationID.x;
    uint L = min(pos[t] + 1u, pc.n_ctx);
    if (pc.window > 0u && L > pc.window) L = pc.window;   // live rows (pass 1 starts at L - window)
    uint R = max(pc.rows, (L + pc.n_splits - 1u) / pc.n_splits);
    uint live = (L + R - 1u) / R;                  // <= n_splits
    uint base = (tl * pc.n_heads + h) * pc.n_splits;
    float mx = -1.0 / 0.0;
    for (uint s = lid; s < live; s += WG) mx = max(mx, pml[base + s].x);
    float M = wg_max(mx);
    float ls = 0.0;
    for (uint s = lid; s < live; s += WG) {
        vec2 e = pml[base + s];
        ls += e.y * exp(e.x - M);
    }
    float inv = 1.0 / wg_sum(ls);

    uint rg = WG >= VU ? lid / VU : 0u, vu0 = WG >= VU ? lid % VU : lid;
    vec4 acc[UPI];
    for (uint i = 0; i < UPI; i++) acc[i] = vec4(0.0);
    if (rg < RG) {
        for (uint s0 = rg; s0 < live; s0 += RG * SB) {
            vec4 pa[SB * UPI];
            float w[SB];
            for (uint k = 0; k < SB; k++) {
                uint s = s0 + k * RG;
                w[k] = s < live ? exp(pml[base + s].x - M) : 0.0;
                for (uint i = 0; i < UPI; i++) {
                    uint u = vu0 + i * WG;
                    pa[k * UPI + i] = s < live && u < VU ? pacc[(base + s) * VU + u] : vec4(0.0);
                }
            }
            for (uint k = 0; k < SB; k++)
                for (uint i = 0; i < UPI; i++) acc[i] += w[k] * pa[k * UPI + i];
        }
    }
    uint ob = t * pc.o_stride + h * HD;
    if (RG > 1) {
        if (rg < RG) racc[rg * VU + vu0] = acc[0];
        barrier();
        if (lid < VU) {
            vec4 s = vec4(0.0);
            for (uint j = 0; j < RG; j++) s += racc[j * VU + lid];
            acc[0] = s;
        }
    }
    for (uint i = 0; i < UPI; i++) {
        uint u = vu0 + i * WG;
        if (rg == 0 && u < VU) {
            vec4 r = acc[i] * inv;
            o[ob + 4u * u] = r.x;
            o[ob + 4u * u + 1u] = r.y;
            o[ob + 4u * u + 2u] = r.z;
            o[ob + 4u * u + 3u] = r.w;
        }
    }
}
