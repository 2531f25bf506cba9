#version 450
// Tiled matmul for prefill: y[t, y_off + r] (+)= sum_c x[t, c] * W[r, c] (+ bias[b_off + r]).
// A workgroup computes a BM-row x BN-token tile. Per K step of BK elements it dequantizes the W tile
// and loads the x tile into shared memory (k-major), then each invocation accumulates a TM x TN
// micro-tile from shared memory: every weight element is reused BN times, every x element BM times.
// Split-K (pc.ksteps > 0): workgroup row y = slice * ceil(T / BN) + token tile, and slice s sums K steps
// s * ksteps .. (s + 1) * ksteps - 1 only, storing its partial tile at y + s * pc.part_stride (the host
// sets no bias and no accumulate, and sums the slices with splitk_sum.comp).
// Grid: x*z = ceil(rows / BM), y = ceil(T / BN) * slices.
#extension GL_GOOGLE_include_directive : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;                // WG = (BM / TM) * (BN / TN)
layout(constant_id = 1) const uint BM = 64;
layout(constant_id = 2) const uint BN = 64;
layout(constant_id = 3) const uint BK = 32;    // multiple of SPAN
layout(constant_id = 4) const uint TM = 4;
layout(constant_id = 5) const uint TN = 4;
const uint TMN = TM * TN;

#define W_BINDING 0
#include "common/dequant.glsl"                  // binding 0: W  (rows, row_bytes(cols)) raw blocks

layout(binding = 1) readonly buffer XB { vec4 x4[]; };    // (T, x_stride) f32, x_stride % 4 == 0
layout(binding = 2) readonly buffer BB { float bias[]; }; // (b_off + rows) f32, read when flags & 1
layout(binding = 3) buffer YB { float y[]; };             // (T, y_stride) f32

layout(push_constant) uniform PC {
    uint rows; uint cols; uint T; uint w_off; uint x_stride; uint y_stride; uint y_off; uint b_off; uint flags;
    uint ksteps; uint part_stride;
} pc;

const uint WS = BK * BM, XS = BK * BN;
shared float Ws[WS];   // [k][r]
shared float Xs[XS];   // [k][t]

void main() {
    uint r0 = (gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x) * BM;
    if (r0 >= pc.rows) return;
    uint tiles = (pc.T + BN - 1) / BN, slice = gl_WorkGroupID.y / tiles;
    uint t0 = (gl_WorkGroupID.y % tiles) * BN;
    uint k_begin = slice * pc.ksteps * BK, k_end = pc.ksteps == 0u ? pc.cols : min(pc.cols, k_begin + pc.ksteps * BK);
    uint lid = gl_LocalInvocationID.x;
    const uint WG = gl_WorkGroupSize.x, RX = BM / TM, TY = BN / TN;
    uint tx = lid % RX, ty = lid / RX;
    uint rbytes = row_bytes(pc.cols);
    const uint UPK = BK / UNIT;                 // units per row per K step

    float acc[TMN];
    for (uint i = 0; i < TMN; i++) acc[i] = 0.0;

    for (uint k0 = k_begin; k0 < k_end; k0 += BK) {
        for (uint i = lid; i < BM * UPK; i += WG) {
            uint r = i / UPK, uu = i % UPK;
            uint row = r0 + r, kk = k0 + uu * UNIT;
            vec4 wv[U4];
            if (row < pc.rows && kk < pc.cols) {
                load_unit(pc.w_off + row * rbytes, kk / UNIT, wv);
            } else {
                for (uint e = 0; e < U4; e++) wv[e] = vec4(0.0);
            }
            for (uint e = 0; e < U4; e++) {
                uint kb = (unit_x(k0 / UNIT + uu, e) - k0) * BM + r;
                Ws[kb] = wv[e].x; Ws[kb + BM] = wv[e].y; Ws[kb + 2 * BM] = wv[e].z; Ws[kb + 3 * BM] = wv[e].w;
            }
        }
        for (uint i = lid; i < BN * (BK / 4); i += WG) {
            uint t = i / (BK / 4), k4 = i % (BK / 4);
            uint tok = t0 + t, kk = k0 + 4 * k4;
            vec4 v = (tok < pc.T && kk < pc.cols) ? x4[(tok * pc.x_stride + kk) >> 2] : vec4(0.0);
            uint xb = 4 * k4 * BN + t;
            Xs[xb] = v.x; Xs[xb + BN] = v.y; Xs[xb + 2 * BN] = v.z; Xs[xb + 3 * BN] = v.w;
        }
        barrier();
        for (uint k = 0; k < BK; k++) {
            float a[TM], b[TN];
            for (uint i = 0; i < TM; i++) a[i] = Ws[k * BM + tx + i * RX];
            for (uint j = 0; j < TN; j++) b[j] = Xs[k * BN + ty + j * TY];
            for (uint i = 0; i < TM; i++)
                for (uint j = 0; j < TN; j++) acc[i * TN + j] += a[i] * b[j];
        }
        barrier();
    }

    for (uint i = 0; i < TM; i++) {
        uint row = r0 + tx + i * RX;
        if (row >= pc.rows) continue;
        float bv = (pc.flags & 1u) != 0u ? bias[pc.b_off + row] : 0.0;
        for (uint j = 0; j < TN; j++) {
            uint tok = t0 + ty + j * TY;
            if (tok >= pc.T) continue;
            uint idx = slice * pc.part_stride + tok * pc.y_stride + pc.y_off + row;
            float s = acc[i * TN + j] + bv;
            if ((pc.flags & 2u) != 0u) s += y[idx];
            y[idx] = s;
        }
    }
}
