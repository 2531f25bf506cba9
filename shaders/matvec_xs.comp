#version 450
// Decode matrix-vector product for one token, x staged in shared memory:
// y[y_off + r] (+)= sum_c x[c] * W[r, c] (+ bias[b_off + r]), weights as stored (common/dequant.glsl).
// matmul.comp's workgroups live for 2 rows each and reload x (and the norm weight) from global memory
// every time: 2-4x the weight bytes. Here each workgroup stages x once, fusions applied, behind one
// barrier; then every subgroup of the dispatch takes NR-row groups in a grid-stride loop and reduces them
// with subgroupAdd alone (no barrier in the loop), so the staging is paid once for all the rows a
// workgroup covers. Bindings and push constants as matmul.comp with T = 1 (T and x_stride unused).
// Grid: x*z = any number of workgroups (the host picks it: more rows per workgroup amortize the staging,
// more workgroups keep more loads in flight), y = 1.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;                // WG: invocations per workgroup (a multiple of the subgroup)
layout(constant_id = 1) const uint NR = 2;     // rows per subgroup per iteration (each x vector serves NR)
layout(constant_id = 2) const uint NU = 2;     // units per lane and row loaded before use (loads in flight)
// FUSE & 1: x is rms_norm(x) * nw: sum(x^2) is gathered while staging, the row sums scaled at the end;
// FUSE & 2: x is silu(x) * u (SwiGLU), u at binding 4. As matmul.comp.
layout(constant_id = 3) const uint FUSE = 0;
// x is staged as f32 when cols * 4 bytes fit the shared memory, else as f16: NVIDIA gives a workgroup
// 48 KiB (12288 f32 columns), and the 8B down projection has 14336 (28 KiB as f16). f16 keeps 11 bits
// (the tensor-core prefill rounds activations to f16 too); products and sums stay f32.
layout(constant_id = 4) const uint XF16 = 0;
layout(constant_id = 5) const uint XN = 1;     // uvec4 slots of xs: cols / 4 (f32) or ceil(cols / 8) (f16)
const uint XU = 4;                             // x vectors each invocation loads at once while staging

#define W_BINDING 0
#include "common/dequant.glsl"                  // binding 0: W  (rows, row_bytes(cols)) raw blocks

layout(binding = 1) readonly buffer XB { vec4 x4[]; };    // (cols) f32
layout(binding = 2) readonly buffer BB { float bias[]; }; // (b_off + rows) f32, read when flags & 1
layout(binding = 3) buffer YB { float y[]; };             // (y_off + rows) f32
layout(binding = 4) readonly buffer UB { vec4 u4[]; };    // FUSE & 2: (cols) f32 up projection
layout(binding = 5) readonly buffer NB { vec4 nw4[]; };   // FUSE & 1: (cols) f32 norm weight

layout(push_constant) uniform PC {
    uint rows;      // rows of W in this dispatch
    uint cols;      // elements per row (multiple of UNIT)
    uint T;         // 1
    uint w_off;     // byte offset of row 0 in binding 0 (multiple of 16)
    uint x_stride;  // unused (one token)
    uint y_stride;  // unused (one token)
    uint y_off;     // element of y that row 0 writes (row-split weights)
    uint b_off;     // element of bias for row 0
    uint flags;     // 1: add bias, 2: accumulate into y
    float eps;      // FUSE & 1
} pc;

shared uvec4 xs[XN];                        // x as the product sees it: 4 f32 or 8 f16 a slot
shared float ss_part[gl_WorkGroupSize.x];   // FUSE & 1: sum(x^2) of each subgroup

// x4[i] with the fusions applied; its sum of squares (raw x, as rms_norm sees it) added to ss.
vec4 fused(vec4 v, uint i, inout float ss) {
    if ((FUSE & 1u) != 0u) ss += dot(v, v);
    if ((FUSE & 2u) != 0u) v = v / (1.0 + exp(-v)) * u4[i];
    if ((FUSE & 1u) != 0u) v *= nw4[i];
    return v;
}

// Stage x into xs; returns the RMS scale (1 without FUSE & 1). Contains the kernel's one barrier.
float stage_x() {
    uint lid = gl_LocalInvocationID.x, n4 = pc.cols / 4u;
    const uint WG = gl_WorkGroupSize.x;
    const uint PER = XF16 != 0u ? 2u : 1u;       // x vectors a slot holds
    uint slots = (n4 + PER - 1u) / PER;          // <= XN
    float ss = 0.0;
    for (uint s0 = lid; s0 < slots; s0 += WG * XU) {
        vec4 v[XU * 2];                           // all loads issued before the first use
        for (uint j = 0; j < XU; j++)
            for (uint p = 0; p < PER; p++) v[j * PER + p] = x4[min((s0 + j * WG) * PER + p, n4 - 1u)];
        for (uint j = 0; j < XU; j++) {
            uint s = s0 + j * WG;
            if (s >= slots) break;
            vec4 a = fused(v[j * PER], s * PER, ss);
            if (XF16 == 0u) {
                xs[s] = floatBitsToUint(a);
            } else {
                vec4 b = s * 2u + 1u < n4 ? fused(v[j * 2u + 1u], s * 2u + 1u, ss) : vec4(0.0);
                xs[s] = uvec4(packHalf2x16(a.xy), packHalf2x16(a.zw), packHalf2x16(b.xy), packHalf2x16(b.zw));
            }
        }
    }
    if ((FUSE & 1u) != 0u) {
        ss = subgroupAdd(ss);
        if (subgroupElect()) ss_part[gl_SubgroupID] = ss;
    }
    barrier();
    if ((FUSE & 1u) == 0u) return 1.0;
    float sum = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++) sum += ss_part[i];
    return inversesqrt(sum / float(pc.cols) + pc.eps);
}

vec4 x_at(uint c) {                             // staged x[c .. c+3], c % 4 == 0
    if (XF16 == 0u) return uintBitsToFloat(xs[c >> 2]);
    uvec4 q = xs[c >> 3];
    uvec2 h = (c & 4u) == 0u ? q.xy : q.zw;
    return vec4(unpackHalf2x16(h.x), unpackHalf2x16(h.y));
}

void main() {
    uint lane = gl_SubgroupInvocationID, S = gl_SubgroupSize;
    uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.z;
    uint sg = gl_SubgroupID + gl_NumSubgroups * (gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x);
    uint rbytes = row_bytes(pc.cols), units = pc.cols / UNIT;

    // The first row group's first weight loads are issued before x is staged, so that the staging's
    // latency (every workgroup starts with it) overlaps theirs. Rows and units are clamped: any address
    // is valid, and loads past the end are never used.
    uint r0 = sg * NR;
    vec4 wv[NR * NU][U4];
    for (uint r = 0; r < NR; r++)
        for (uint j = 0; j < NU; j++)
            load_unit(pc.w_off + min(r0 + r, pc.rows - 1u) * rbytes, min(lane + j * S, units - 1u), wv[r * NU + j]);
    bool loaded = true;
    float scale = stage_x();

    // Loops have constant trip counts (rows past the end are clamped, their sums dropped at the write) so
    // that wv/xv/acc stay in registers; the row loop's bound is uniform for the subgroup.
    for (; r0 < pc.rows; r0 += groups * gl_NumSubgroups * NR) {
        uint rb[NR];
        for (uint r = 0; r < NR; r++) rb[r] = pc.w_off + min(r0 + r, pc.rows - 1u) * rbytes;
        float acc[NR];
        for (uint r = 0; r < NR; r++) acc[r] = 0.0;
        for (uint u0 = lane; u0 < units; u0 += S * NU) {
            if (!loaded)
                for (uint r = 0; r < NR; r++)
                    for (uint j = 0; j < NU; j++)
                        load_unit(rb[r], min(u0 + j * S, units - 1u), wv[r * NU + j]);
            loaded = false;
            for (uint j = 0; j < NU; j++) {
                uint u = u0 + j * S;
                uint uc = min(u, units - 1u);
                vec4 xv[U4];
                for (uint k = 0; k < U4; k++) xv[k] = x_at(unit_x(uc, k));
                for (uint r = 0; r < NR; r++) {
                    float s = 0.0;
                    for (uint k = 0; k < U4; k++) s += dot(wv[r * NU + j][k], xv[k]);
                    acc[r] += u < units ? s : 0.0;
                }
            }
        }
        for (uint r = 0; r < NR; r++) {
            float s = subgroupAdd(acc[r]) * scale;
            uint row = r0 + r;
            if (lane == 0u && row < pc.rows) {
                uint idx = pc.y_off + row;
                if ((pc.flags & 1u) != 0u) s += bias[pc.b_off + row];
                if ((pc.flags & 2u) != 0u) s += y[idx];
                y[idx] = s;
            }
        }
    }
}
