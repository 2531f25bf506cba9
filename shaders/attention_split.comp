#version 450
// Split-K ("flash-decoding") attention for few tokens, pass 1 of 2 (attention_merge.comp is pass 2).
// Query t (row t0 + z of q and pos) attends to positions LO..L-1, L = min(pos[t] + 1, n_ctx), LO = 0 or
// L - window (sliding-window layers); ring > 0: the cache is a ring of `ring` rows, position j at row
// j % ring, and L = pos[t] + 1 (the ring holds the window and the pass's new rows). Those rows
// are cut into n_splits splits of R = max(rows, ceil((L - LO) / n_splits)) rows, read at run time, so one
// recording serves every position; splits starting at or past L write an empty partial (-inf, 0).
// One workgroup per (kv head and block of up to GB of its query heads, split, token): every K/V row
// is read once for all GB heads. The split walks its rows in chunks of RC: scores by clusters of LPR
// lanes per row (coalesced K loads, shuffle-xor sums), online softmax, then V accumulated with
// invocations over head_dim (coalesced). Output per (token, head, split): acc[HD] = sum_r p_r V_r and
// (m, l) with p_r = exp(s_r - m), l = sum_r p_r. Grid: x = n_splits, y = n_kv_heads * ceil(G / GB), z = T
// (splits fastest: a CPU driver that cuts the grid into contiguous ranges gives each thread live splits).
// FUSE = 1 (decode: rope(q), rope(k) and kv_store folded in, one barrier fewer per layer): q is rotated
// as it is loaded; the pass's new rows, positions P0 = pos[t0] onward (consecutive), come from k, v
// (keys rotated, rounded as the cache stores them) instead of the cache, and one workgroup per (token,
// kv head) writes its token's row into the caches for later passes (no workgroup reads it from there).
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;
#include "common/rope.glsl"
layout(constant_id = 1) const uint HD = 128;   // head_dim (multiple of 4)
layout(constant_id = 2) const uint GB = 4;     // query heads per workgroup
layout(constant_id = 3) const uint LPR = 8;    // lanes per K row in the scores: power of 2 <= subgroup size
layout(constant_id = 4) const uint RC = 64;    // rows per chunk (their scores live in shared memory)
// MERGE = 1: the workgroup that finishes last among the splits of its (heads, token) merges them into
// `o` (counted with an atomic per group, reset by that workgroup): no second dispatch, no barrier.
layout(constant_id = 5) const uint MERGE = 0;
layout(constant_id = 6) const uint FUSE = 0;
layout(constant_id = 7) const uint NR = 1;     // FUSE: new rows staged in shared memory (>= T)
const uint WG = gl_WorkGroupSize.x;            // a multiple of LPR
const uint VU = HD / 4;                        // 4-float units per head row
const uint UPL = (VU + LPR - 1) / LPR;         // units per lane in the scores
const uint RPI = (16 + UPL - 1) / UPL;         // rows per cluster loaded at once (~16 units in flight)
const uint NC = WG / LPR;                      // clusters: rows scored side by side
const uint RG = WG >= VU ? WG / VU : 1;        // row groups in the V pass
const uint UPI = WG >= VU ? 1 : (VU + WG - 1) / WG;   // units per invocation in the V pass
const uint VB = (8 + UPI - 1) / UPI;           // V rows loaded at once

// Eight bindings (the recorder's sets): q and the new k, v share one (the pass's activations), the
// partials and their (m, l) another.
layout(binding = 0) readonly buffer AB { float act[]; };   // q (T, q_stride) at q_off; FUSE: k, v (T, kv_dim)
#ifdef KV_F16
layout(binding = 1) readonly buffer KC { uvec2 kc[]; };    // (n_ctx, kv_dim) f16, 4 per uvec2
layout(binding = 2) readonly buffer VC { uvec2 vc[]; };
layout(binding = 1) writeonly buffer KW { uvec2 kw[]; };   // FUSE: the same caches, new rows only
layout(binding = 2) writeonly buffer VW { uvec2 vw[]; };
#else
layout(binding = 1) readonly buffer KC { vec4 kc[]; };     // (n_ctx, kv_dim) f32
layout(binding = 2) readonly buffer VC { vec4 vc[]; };
layout(binding = 1) writeonly buffer KW { vec4 kw[]; };
layout(binding = 2) writeonly buffer VW { vec4 vw[]; };
#endif
layout(binding = 3) readonly buffer PB { uint pos[]; };    // (T) positions
layout(binding = 4) coherent buffer PA { vec4 pacc[]; };   // (T, n_heads, n_splits, HD) partial sums
layout(binding = 4) coherent buffer PM { vec2 pml[]; };    // at ml_off: (T, n_heads, n_splits) (m, l)
layout(binding = 5) writeonly buffer OB { float o[]; };    // MERGE: (T, o_stride) f32 output
layout(binding = 6) coherent buffer CB { uint count[]; };  // MERGE: splits done per (token row, y); zeros
layout(binding = 7) readonly buffer FB { float ff[]; };    // FUSE: (n_rot / 2) frequency divisors

layout(push_constant) uniform PC {
    uint T;
    uint n_heads;
    uint n_kv_heads;
    uint n_ctx;
    uint q_stride;
    uint t0;        // first token row
    uint rows;      // rows per split, at least
    uint n_splits;
    float scale;
    uint o_stride;  // MERGE
    uint q_off;     // floats before q, the keys, the values in act
    uint k_off;     // FUSE
    uint v_off;     // FUSE
    uint ml_off;    // vec2s before (m, l) in the partials' binding
    uint n_rot;     // rotated dims per head (even, <= HD; 0: no rope)
    uint rope;      // 1: neox pairs (i, i + n_rot/2), else norm (2i, 2i+1); 2: divide frequencies by ff
    float base;
    float freq_scale;
    uint window;    // > 0: query at position p sees rows p - window + 1 .. p only (sliding-window layers)
    float softcap;  // > 0: scores s become softcap * tanh(s / softcap) (gemma2)
    uint ring;      // > 0: rows in the ring cache (row = position % ring); 0: row = position < n_ctx
} pc;

shared bool last_one;

// MERGE epilogue, after this workgroup's partials are written: count it; the last of the group
// combines all live splits of its heads as attention_merge.comp does.
void merge_if_last(uint h0, uint ng, uint tl, uint t, uint L, uint R) {   // L: live rows
    uint lid = gl_LocalInvocationID.x;
    memoryBarrierBuffer();                      // this workgroup's partials, before it is counted
    barrier();
    if (lid == 0) {
        uint c = (pc.t0 + tl) * gl_NumWorkGroups.y + gl_WorkGroupID.y;
        last_one = atomicAdd(count[c], 1u) == pc.n_splits - 1u;
        if (last_one) count[c] = 0u;            // ready for the next replay
    }
    barrier();
    if (!last_one) return;
    memoryBarrierBuffer();
    uint live = (L + R - 1u) / R;
    for (uint i = gl_LocalInvocationID.x; i < ng * VU; i += gl_WorkGroupSize.x) {
        uint g = i / VU, u = i % VU;
        uint base = (tl * pc.n_heads + h0 + g) * pc.n_splits;
        float M = -1.0 / 0.0;
        for (uint s = 0; s < live; s++) M = max(M, pml[pc.ml_off + base + s].x);
        float l = 0.0;
        vec4 a = vec4(0.0);
        for (uint s = 0; s < live; s++) {
            vec2 e = pml[pc.ml_off + base + s];
            float w = exp(e.x - M);
            l += e.y * w;
            a += w * pacc[(base + s) * VU + u];
        }
        a /= l;
        uint ob = t * pc.o_stride + (h0 + g) * HD + 4u * u;
        o[ob] = a.x;
        o[ob + 1u] = a.y;
        o[ob + 2u] = a.z;
        o[ob + 3u] = a.w;
    }
}

shared vec4 qs[GB * VU];                        // scaled queries of the GB heads
shared vec4 kns[FUSE != 0u ? NR * VU : 1];      // FUSE: rotated new keys of this kv head, row P0 + i at i
shared float ps[GB * RC];                       // the chunk's scores, then probabilities
shared float red[GB * WG];                      // per-subgroup maxima
shared vec4 racc[RG > 1 ? RG * GB * VU : 1];    // row-group sums
shared float rl[RG * GB];

#ifdef KV_F16
vec4 k4(uint i) { uvec2 a = kc[i]; return vec4(unpackHalf2x16(a.x), unpackHalf2x16(a.y)); }
vec4 v4(uint i) { uvec2 a = vc[i]; return vec4(unpackHalf2x16(a.x), unpackHalf2x16(a.y)); }
uvec2 kv_pack(vec4 x) { return uvec2(packHalf2x16(x.xy), packHalf2x16(x.zw)); }
vec4 kv_round(vec4 x) { return vec4(unpackHalf2x16(packHalf2x16(x.xy)), unpackHalf2x16(packHalf2x16(x.zw))); }
#else
vec4 k4(uint i) { return kc[i]; }
vec4 v4(uint i) { return vc[i]; }
vec4 kv_pack(vec4 x) { return x; }
vec4 kv_round(vec4 x) { return x; }
#endif

// FUSE: element d of a head rotated to position p as rope.comp does it (x: element d, y: its partner).
float rope_elem(float x, float y, uint d, uint p) {
    uint hr = pc.n_rot / 2u;
    if (d >= pc.n_rot) return x;
    bool neox = (pc.rope & 1u) != 0u;
    uint i = neox ? d % hr : d / 2u;
    float theta = rope_theta(i, p, pc.n_rot, pc.base, pc.freq_scale, (pc.rope & 2u) != 0u ? ff[i] : 1.0);
    bool first = neox ? d < hr : (d & 1u) == 0u;
    return first ? rope_rotate(x, y, theta).x : rope_rotate(y, x, theta).y;
}

uint kv_row(uint j) { return pc.ring > 0u ? j % pc.ring : j; }   // the cache row of position j

uint rope_partner(uint d) {
    uint hr = pc.n_rot / 2u;
    if (d >= pc.n_rot) return d;
    if ((pc.rope & 1u) != 0u) return d < hr ? d + hr : d - hr;
    return d ^ 1u;
}

// FUSE: unit u (dims 4u..4u+3) of the head at act[b..b+HD), rotated to position p.
vec4 rope4(uint b, uint u, uint p) {
    vec4 r;
    for (uint e = 0u; e < 4u; e++) {
        uint d = 4u * u + e;
        r[e] = rope_elem(act[b + d], act[b + rope_partner(d)], d, p);
    }
    return r;
}

void main() {
    const float NEG_INF = -1.0 / 0.0;
    uint lid = gl_LocalInvocationID.x;
    uint G = pc.n_heads / pc.n_kv_heads, HB = (G + GB - 1) / GB;
    uint kvh = gl_WorkGroupID.y / HB, g0 = gl_WorkGroupID.y % HB * GB;
    uint ng = min(GB, G - g0), h0 = kvh * G + g0;           // heads h0..h0+ng-1
    uint split = gl_WorkGroupID.x, tl = gl_WorkGroupID.z, t = tl + pc.t0;
    uint L = pc.ring > 0u ? pos[t] + 1u : min(pos[t] + 1u, pc.n_ctx);
    uint LO = pc.window > 0u && L > pc.window ? L - pc.window : 0u;   // first live position
    uint R = max(pc.rows, (L - LO + pc.n_splits - 1u) / pc.n_splits);
    uint j0 = LO + split * R, j1 = min(j0 + R, L);
    uint pidx = (tl * pc.n_heads + h0) * pc.n_splits + split;   // head g: pidx + g * n_splits
    uint P0 = FUSE != 0u ? pos[pc.t0] : 0u;                      // FUSE: row P0 + i is new row t0 + i
    if (j0 >= L) {                                               // uniform: past the end
        if (lid < ng) pml[pc.ml_off + pidx + lid * pc.n_splits] = vec2(NEG_INF, 0.0);
        if (MERGE != 0u) merge_if_last(h0, ng, tl, t, L - LO, R);
        return;
    }
    for (uint i = lid; i < GB * VU; i += WG) {
        uint g = i / VU, hb = pc.q_off + t * pc.q_stride + (h0 + g) * HD, b = hb + 4u * (i % VU);
        qs[i] = g >= ng ? vec4(0.0)
              : (FUSE != 0u ? rope4(hb, i % VU, pos[t]) : vec4(act[b], act[b + 1], act[b + 2], act[b + 3])) * pc.scale;
    }
    uint rowu = pc.n_kv_heads * VU, kb = kvh * VU;   // units per cache row, head offset
    uint kvd = pc.n_kv_heads * HD;
    if (FUSE != 0u && j1 > max(j0, P0)) {             // this split's new rows: rotate their keys once
        uint a = max(j0, P0) - P0;
        for (uint i = lid; i < (j1 - P0 - a) * VU; i += WG) {
            uint r = a + i / VU;
            kns[r * VU + i % VU] = kv_round(rope4(pc.k_off + (pc.t0 + r) * kvd + kvh * HD, i % VU, P0 + r));
        }
    }
    barrier();
    // the token's own row (the last of the last live split) goes into the caches: one workgroup writes it
    if (FUSE != 0u && (pc.ring > 0u || pos[t] < pc.n_ctx) && split == (L - 1u - LO) / R && g0 == 0u) {
        for (uint u = lid; u < VU; u += WG) {
            uint vb = pc.v_off + t * kvd + kvh * HD + 4u * u, o = kv_row(pos[t]) * rowu + kb + u;
            kw[o] = kv_pack(kns[tl * VU + u]);
            vw[o] = kv_pack(vec4(act[vb], act[vb + 1], act[vb + 2], act[vb + 3]));
        }
    }
    uint cl = lid / LPR, ln = lid % LPR;              // scores: cluster (row) and lane
    uint rg = WG >= VU ? lid / VU : 0u, vu0 = WG >= VU ? lid % VU : lid;   // V pass: row group, unit
    float m[GB], l[GB];
    vec4 acc[GB * UPI];
    for (uint g = 0; g < GB; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0;
        for (uint i = 0; i < UPI; i++) acc[g * UPI + i] = vec4(0.0);
    }

    for (uint c0 = j0; c0 < j1; c0 += RC) {
        uint n = min(RC, j1 - c0);
        float mx[GB];
        for (uint g = 0; g < GB; g++) mx[g] = NEG_INF;
        for (uint r0 = 0; r0 < n; r0 += NC * RPI) {      // uniform trip count: shuffles stay convergent
            vec4 kr[RPI * UPL];
            for (uint k = 0; k < RPI; k++) {
                uint r = r0 + k * NC + cl;
                for (uint i = 0; i < UPL; i++) {
                    uint u = ln + i * LPR;
                    uint j = c0 + r;
                    kr[k * UPL + i] = r >= n || u >= VU ? vec4(0.0)
                                    : FUSE != 0u && j >= P0 ? kns[(j - P0) * VU + u] : k4(kv_row(j) * rowu + kb + u);
                }
            }
            for (uint k = 0; k < RPI; k++) {
                uint r = r0 + k * NC + cl;
                for (uint g = 0; g < GB; g++) {
                    float s = 0.0;
                    for (uint i = 0; i < UPL; i++) {
                        uint u = ln + i * LPR;
                        if (u < VU) s += dot(qs[g * VU + u], kr[k * UPL + i]);
                    }
                    for (uint o = LPR / 2; o > 0; o >>= 1) s += subgroupShuffleXor(s, o);
                    if (pc.softcap > 0.0) s = pc.softcap * tanh(clamp(s / pc.softcap, -15.0, 15.0));
                    if (r < n) {
                        mx[g] = max(mx[g], s);
                        if (ln == 0) ps[g * RC + r] = s;
                    }
                }
            }
        }
        for (uint g = 0; g < GB; g++) {
            mx[g] = subgroupMax(mx[g]);
            if (subgroupElect()) red[g * WG + gl_SubgroupID] = mx[g];
        }
        barrier();
        for (uint g = 0; g < GB; g++) {                   // new running max; rescale the old sums
            float mn = m[g];
            for (uint i = 0; i < gl_NumSubgroups; i++) mn = max(mn, red[g * WG + i]);
            float alpha = exp(m[g] - mn);
            m[g] = mn;
            l[g] *= alpha;
            for (uint i = 0; i < UPI; i++) acc[g * UPI + i] *= alpha;
            for (uint r = lid; r < n; r += WG) ps[g * RC + r] = exp(ps[g * RC + r] - mn);
        }
        barrier();
        if (rg < RG) {
            for (uint r0 = rg; r0 < n; r0 += RG * VB) {
                vec4 vr[VB * UPI];
                for (uint k = 0; k < VB; k++) {
                    uint r = r0 + k * RG;
                    for (uint i = 0; i < UPI; i++) {
                        uint u = vu0 + i * WG;
                        uint j = c0 + r, b = pc.v_off + (pc.t0 + j - P0) * kvd + kvh * HD + 4u * u;
                        vr[k * UPI + i] = r >= n || u >= VU ? vec4(0.0)
                                        : FUSE != 0u && j >= P0 ? kv_round(vec4(act[b], act[b + 1], act[b + 2], act[b + 3]))
                                        : v4(kv_row(j) * rowu + kb + u);
                    }
                }
                for (uint k = 0; k < VB; k++) {
                    uint r = r0 + k * RG;
                    if (r >= n) break;
                    for (uint g = 0; g < GB; g++) {
                        float p = ps[g * RC + r];
                        l[g] += p;
                        for (uint i = 0; i < UPI; i++) acc[g * UPI + i] += p * vr[k * UPI + i];
                    }
                }
            }
        }
        barrier();                                        // ps and red are rewritten by the next chunk
    }

    if (RG == 1) {
        if (rg == 0) {
            for (uint g = 0; g < GB; g++)
                for (uint i = 0; i < UPI; i++) {
                    uint u = vu0 + i * WG;
                    if (g < ng && u < VU) pacc[(pidx + g * pc.n_splits) * VU + u] = acc[g * UPI + i];
                }
        }
        for (uint g = 0; g < GB; g++)
            if (lid == 0 && g < ng) pml[pc.ml_off + pidx + g * pc.n_splits] = vec2(m[g], l[g]);
        if (MERGE != 0u) merge_if_last(h0, ng, tl, t, L - LO, R);
        return;
    }
    if (rg < RG) {
        for (uint g = 0; g < GB; g++) {
            racc[(rg * GB + g) * VU + vu0] = acc[g];
            if (vu0 == 0) rl[rg * GB + g] = l[g];
        }
    }
    barrier();
    for (uint i = lid; i < ng * VU; i += WG) {
        uint g = i / VU, u = i % VU;
        vec4 s = vec4(0.0);
        for (uint j = 0; j < RG; j++) s += racc[(j * GB + g) * VU + u];
        pacc[(pidx + g * pc.n_splits) * VU + u] = s;
    }
    for (uint g = 0; g < GB; g++) {
        if (lid != g || g >= ng) continue;
        float s = 0.0;
        for (uint j = 0; j < RG; j++) s += rl[j * GB + g];
        pml[pc.ml_off + pidx + g * pc.n_splits] = vec2(m[g], s);
    }
    if (MERGE != 0u) merge_if_last(h0, ng, tl, t, L - LO, R);
}
