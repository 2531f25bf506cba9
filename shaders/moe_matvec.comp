#version 450
// A mixture of experts' decode products, every chosen expert in ONE dispatch (runtime/vk/moe.py, batched path):
//   y[yrow(s), r] = sum_c x[xrow(s), c] * W_s[r, c]   for each slot s (grid y) and row r < rows,
// where slot s's weight is wherever the device tier placed it: block blk(s) of the tier (binding 0 is the
// array of the tier's blocks) at byte w_off(s), read from a table the host writes each pass. So a layer is
// one cached recording whatever its router chose (llama.cpp's mul_mat_id does the same). The product is
// matvec.comp's: each subgroup owns NR rows, reduced with subgroupAdd; weights as stored (common/dequant.glsl).
// Grid: x*z = ceil(rows / RPW), y = slots.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_EXT_shader_16bit_storage : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint NR = 1;
layout(constant_id = 2) const uint RPW = 4;
layout(constant_id = 3) const uint NU = 4;

#define MAX_BLOCKS 16
layout(binding = 0) readonly buffer WA16 { uint16_t d[]; } wa16[MAX_BLOCKS];
layout(binding = 0) readonly buffer WA32 { uint d[]; } wa32[MAX_BLOCKS];
layout(binding = 0) readonly buffer WA128 { uvec4 d[]; } wa128[MAX_BLOCKS];
uint wblk;   // the slot's tier block: the same for the whole workgroup (dynamically uniform)
#define W_ARRAY 1
#define w16 wa16[wblk].d
#define w32 wa32[wblk].d
#define w128 wa128[wblk].d
#include "common/dequant.glsl"

layout(binding = 1) readonly buffer XB { vec4 x4[]; };
layout(binding = 2) readonly buffer TB { uint tbl[]; };   // per slot: blk, w_off, xrow, yrow
layout(binding = 3) buffer YB { float y[]; };

layout(push_constant) uniform PC {
    uint rows;
    uint cols;
    uint x_stride;
    uint y_stride;
    uint tbl_off;   // uint index of slot 0's entry
} pc;

void rows_at(uint r0, uint woff, uint xb, uint yb) {
    uint lane = gl_SubgroupInvocationID, S = gl_SubgroupSize;
    uint rbytes = row_bytes(pc.cols), units = pc.cols / UNIT;
    uint rb[NR];
    for (uint r = 0; r < NR; r++) rb[r] = woff + min(r0 + r, pc.rows - 1u) * rbytes;
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
        uint row = r0 + r;
        if (lane == 0 && row < pc.rows) y[yb + row] = s;
    }
}

void main() {
    uint slot = gl_WorkGroupID.y, e = pc.tbl_off + 4u * slot;
    wblk = tbl[e];
    uint woff = tbl[e + 1u], xb = tbl[e + 2u] * pc.x_stride, yb = tbl[e + 3u] * pc.y_stride;
    uint wg = gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x;
    for (uint base = gl_SubgroupID * NR; base < RPW; base += gl_NumSubgroups * NR) {
        uint r0 = wg * RPW + base;
        if (r0 >= pc.rows) return;
        rows_at(r0, woff, xb, yb);
    }
}
