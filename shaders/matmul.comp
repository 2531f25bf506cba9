#version 450
// y[t, y_off + r] (+)= sum_c x[t, c] * W[r, c] (+ bias[b_off + r]) for weights stored as GGML blocks.
// One workgroup computes NR rows x NT tokens; its invocations split each row into UNIT-element pieces
// (see common/dequant.glsl), keep NR*NT partial sums and reduce them at the end. Each weight piece is
// dequantized once and used for NT tokens: NT = 1 is the decode matvec, NT > 1 the prefill matmul.
// Grid: x*z = ceil(rows / NR) (split over z past 65535), y = ceil(T / NT).
#extension GL_GOOGLE_include_directive : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;                // WG: invocations per workgroup
layout(constant_id = 1) const uint NR = 1;     // rows per workgroup
layout(constant_id = 2) const uint NT = 1;     // tokens per workgroup
layout(constant_id = 3) const uint NU = 1;     // units loaded per invocation before use (loads in flight)
// Fusions of the op before the product into its x loads (decode: one dispatch and one barrier fewer):
// FUSE & 1: x is rms_norm(x) * nw: sum(x^2) is gathered from the same loads, the row sums scaled at
//           the end; FUSE & 2: x is silu(x) * u (SwiGLU), u at binding 4.
layout(constant_id = 4) const uint FUSE = 0;
layout(constant_id = 5) const bool ONE_BARRIER = true;   // all sums in one barrier (false: wg_sum each)
const uint NRT = NR * NT;

#define W_BINDING 0
#include "common/dequant.glsl"                  // binding 0: W  (rows, row_bytes(cols)) raw blocks
#include "common/reduce.glsl"

layout(binding = 1) readonly buffer XB { vec4 x4[]; };    // (T, x_stride) f32, x_stride % 4 == 0
layout(binding = 2) readonly buffer BB { float bias[]; }; // (b_off + rows) f32, read when flags & 1
layout(binding = 3) buffer YB { float y[]; };             // (T, y_stride) f32
layout(binding = 4) readonly buffer UB { vec4 u4[]; };    // FUSE & 2: (T, x_stride) f32 up projection
layout(binding = 5) readonly buffer NB { vec4 nw4[]; };   // FUSE & 1: (cols) f32 norm weight

layout(push_constant) uniform PC {
    uint rows;      // rows of W in this dispatch
    uint cols;      // elements per row (multiple of UNIT)
    uint T;         // tokens
    uint w_off;     // byte offset of row 0 in binding 0 (multiple of 16)
    uint x_stride;  // floats between tokens in x
    uint y_stride;  // floats between tokens in y
    uint y_off;     // column of y that row 0 writes (row-split weights)
    uint b_off;     // element of bias for row 0
    uint flags;     // 1: add bias, 2: accumulate into y
    float eps;      // FUSE & 1
} pc;

vec4 x_at(uint i, uint c4) {                 // x4[i] as the product sees it; c4: its column / 4
    vec4 v = x4[i];
    if ((FUSE & 2u) != 0u) { vec4 u = u4[i]; v = v / (1.0 + exp(-v)) * u; }
    if ((FUSE & 1u) != 0u) v *= nw4[c4];
    return v;
}

// y[token, row] (+)= s (+ bias), for a row and token that exist
void store(uint row, uint token, bool exists, float s) {
    if (row >= pc.rows || !exists) return;
    uint idx = token * pc.y_stride + pc.y_off + row;
    if ((pc.flags & 1u) != 0u) s += bias[pc.b_off + row];
    if ((pc.flags & 2u) != 0u) s += y[idx];
    y[idx] = s;
}

#ifndef NO_SUBGROUP
// The sums' subgroup parts, for subgroups of at least MIN_SUBGROUP invocations (narrower ones: wg_sum).
const uint MIN_SUBGROUP = 4;
shared float sums[(NRT + NT) * (gl_WorkGroupSize.x / MIN_SUBGROUP)];
#endif

void main() {
    uint r0 = group_index() * NR;
    if (r0 >= pc.rows) return;                  // uniform for the workgroup
    uint t0 = gl_WorkGroupID.y * NT;
    uint nt = min(NT, pc.T - t0);             // tokens of this workgroup that exist
    uint lid = gl_LocalInvocationID.x;
    uint rbytes = row_bytes(pc.cols);
    uint units = pc.cols / UNIT;

    // All loops have constant trip counts (rows and tokens are clamped, their results dropped at the
    // write) so that drivers unroll them and keep wv/xv/acc in registers. Each x vector is loaded once
    // and used for all NR rows: with NR = 1, x loads (from cache) would outnumber weight loads.
    float acc[NRT];
    for (uint i = 0; i < NRT; i++) acc[i] = 0.0;
    float ss[NT];                                 // FUSE & 1: sum of x^2 per token
    for (uint t = 0; t < NT; t++) ss[t] = 0.0;
    const uint STEP = gl_WorkGroupSize.x * NU;
    uint rb[NR];
    for (uint r = 0; r < NR; r++) rb[r] = pc.w_off + min(r0 + r, pc.rows - 1u) * rbytes;

    for (uint u0 = lid; u0 < units; u0 += STEP) {
        vec4 wv[NR * NU][U4];
        for (uint r = 0; r < NR; r++)
            for (uint j = 0; j < NU; j++)
                load_unit(rb[r], min(u0 + j * gl_WorkGroupSize.x, units - 1u), wv[r * NU + j]);
        for (uint j = 0; j < NU; j++) {
            uint u = u0 + j * gl_WorkGroupSize.x;
            uint uc = min(u, units - 1u);
            for (uint t = 0; t < NT; t++) {
                uint xb = min(t0 + t, pc.T - 1u) * pc.x_stride;
                vec4 xv[U4];
                for (uint k = 0; k < U4; k++) {
                    uint c = unit_x(uc, k);
                    if ((FUSE & 1u) != 0u) {
                        vec4 raw = x4[(xb + c) >> 2];
                        ss[t] += u < units ? dot(raw, raw) : 0.0;
                    }
                    xv[k] = x_at((xb + c) >> 2, c >> 2);
                }
                for (uint r = 0; r < NR; r++) {
                    float s = 0.0;
                    for (uint k = 0; k < U4; k++) s += dot(wv[r * NU + j][k], xv[k]);
                    acc[r * NT + t] += u < units ? s : 0.0;
                }
            }
        }
    }

#ifndef NO_SUBGROUP
    if (ONE_BARRIER && gl_NumSubgroups > 1u && gl_NumSubgroups * MIN_SUBGROUP <= gl_WorkGroupSize.x) {
        // Every sum at once: one barrier for all NRT (+ NT) of them, where wg_sum takes two each. Invocation
        // i < NRT then adds sum i's subgroup parts in subgroup order (wg_sum's order: the same bits).
        uint sg = gl_SubgroupID, nsg = gl_NumSubgroups;
        for (uint i = 0; i < NRT; i++) acc[i] = subgroupAdd(acc[i]);
        if ((FUSE & 1u) != 0u)
            for (uint t = 0; t < NT; t++) ss[t] = subgroupAdd(ss[t]);
        if (subgroupElect()) {
            for (uint i = 0; i < NRT; i++) sums[i * nsg + sg] = acc[i];
            if ((FUSE & 1u) != 0u)
                for (uint t = 0; t < NT; t++) sums[(NRT + t) * nsg + sg] = ss[t];
        }
        barrier();
        for (uint i = lid; i < NRT; i += gl_WorkGroupSize.x) {
            uint r = i / NT, t = i % NT;
            float s = 0.0;
            for (uint g = 0; g < nsg; g++) s += sums[i * nsg + g];
            if ((FUSE & 1u) != 0u) {
                float q = 0.0;
                for (uint g = 0; g < nsg; g++) q += sums[(NRT + t) * nsg + g];
                s *= inversesqrt(q / float(pc.cols) + pc.eps);
            }
            store(r0 + r, t0 + t, t < nt, s);
        }
        return;
    }
#endif
    float scale[NT];
    for (uint t = 0; t < NT; t++)
        scale[t] = (FUSE & 1u) != 0u ? inversesqrt(wg_sum(ss[t]) / float(pc.cols) + pc.eps) : 1.0;
    for (uint i = 0; i < NRT; i++) {
        uint r = i / NT, t = i % NT;
        float s = wg_sum(acc[i]) * scale[t];
        if (lid == 0) store(r0 + r, t0 + t, t < nt, s);
    }
}
