#version 450
// Decode matrix-vector product, y[t, y_off + r] (+)= sum_c x[t, c] * W[r, c] (+ bias[b_off + r]),
// with weights as stored (common/dequant.glsl). Each SUBGROUP owns NR rows and reduces them with
// subgroupAdd alone: no shared memory and no barriers, so a workgroup's subgroups never wait for
// each other and a row's partial sums never leave registers. Each lane keeps NU units of each row
// in flight. Same bindings and push constants as matmul.comp; one token per workgroup row (grid y).
// Grid: x*z = ceil(rows / RPW), y = T.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;                // WG: invocations per workgroup (a multiple of the subgroup)
layout(constant_id = 1) const uint NR = 1;     // rows a subgroup works on at once
layout(constant_id = 2) const uint RPW = 4;    // rows per workgroup (multiple of NR); subgroups take
                                               // turns, so any subgroup size the driver picks is right
layout(constant_id = 3) const uint NU = 4;     // units per lane loaded before use

#define W_BINDING 0
#include "common/dequant.glsl"

#include "common/subgroup_rows.glsl"

void rows_at(uint r0, uint t) {
    uint lane = gl_SubgroupInvocationID, S = gl_SubgroupSize;
    uint rbytes = row_bytes(pc.cols), units = pc.cols / UNIT, xb = t * pc.x_stride;
    uint rb[NR];
    for (uint r = 0; r < NR; r++) rb[r] = pc.w_off + min(r0 + r, pc.rows - 1u) * rbytes;
    float acc[NR];
    for (uint r = 0; r < NR; r++) acc[r] = 0.0;

    for (uint u0 = lane; u0 < units; u0 += S * NU) {
        vec4 wv[NR * NU][U4];
        for (uint r = 0; r < NR; r++)
            for (uint j = 0; j < NU; j++)
                load_unit(rb[r], min(u0 + j * S, units - 1u), wv[r * NU + j]);
        for (uint j = 0; j < NU; j++) {
            uint u = u0 + j * S;
            uint uc = min(u, units - 1u);
            vec4 xv[U4];
            for (uint k = 0; k < U4; k++) xv[k] = x4[(xb + unit_x(uc, k)) >> 2];
            for (uint r = 0; r < NR; r++) {
                float s = 0.0;
                for (uint k = 0; k < U4; k++) s += dot(wv[r * NU + j][k], xv[k]);
                acc[r] += u < units ? s : 0.0;
            }
        }
    }
    for (uint r = 0; r < NR; r++) {
        float s = subgroupAdd(acc[r]);
        if (lane == 0) store_row(t, r0 + r, s);
    }
}
