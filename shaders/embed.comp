#version 450
// out[t, :] = dequantized row ids[t] of W (a token-embedding gather); ids >= n_rows give zeros.
// Grid: x = ceil(cols / UNIT / WG), y = T. One invocation per UNIT-element piece.
#extension GL_GOOGLE_include_directive : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;

#define W_BINDING 0
#include "common/dequant.glsl"                  // binding 0: W (n_rows, row_bytes(cols)) raw blocks

layout(binding = 1) readonly buffer IB { uint ids[]; };   // (T) token ids
layout(binding = 2) writeonly buffer OB { vec4 o4[]; };   // (T, o_stride) f32, o_stride % 4 == 0

layout(push_constant) uniform PC {
    uint n_rows;    // rows of W (vocabulary size of this part)
    uint cols;
    uint T;
    uint w_off;     // byte offset of row 0 in binding 0
    uint o_stride;  // floats between tokens in out
    uint id_off;    // subtracted from ids (row-split tables: this part holds ids id_off..id_off+n_rows-1)
    uint flags;     // 1: leave rows whose id is outside this part untouched instead of writing zeros
} pc;

void main() {
    uint u = gl_GlobalInvocationID.x, t = gl_WorkGroupID.y;
    if (u >= pc.cols / UNIT || t >= pc.T) return;
    uint row = ids[t] - pc.id_off;              // wraps around for ids below id_off
    uint ob = t * pc.o_stride;
    if (row >= pc.n_rows) {
        if ((pc.flags & 1u) == 0u)
            for (uint k = 0; k < U4; k++) o4[(ob + unit_x(u, k)) >> 2] = vec4(0.0);
        return;
    }
    vec4 wv[U4];
    load_unit(pc.w_off + row * row_bytes(pc.cols), u, wv);
    for (uint k = 0; k < U4; k++) o4[(ob + unit_x(u, k)) >> 2] = wv[k];
}
