#version 450
// out[r] = index of the largest x[r, :] (first one on ties, as numpy). Grid: x*z = rows.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;
#include "common/reduce.glsl"
layout(binding = 0) readonly buffer XB { float x[]; };    // (rows, stride) f32 logits
layout(binding = 1) writeonly buffer OB { uint o[]; };    // (rows) token ids
layout(push_constant) uniform PC { uint rows; uint n; uint stride; } pc;

void main() {
    uint r = group_index();
    if (r >= pc.rows) return;
    uint lid = gl_LocalInvocationID.x;
    float best = -1.0 / 0.0;
    uint bi = 0xFFFFFFFFu;
    for (uint i = lid; i < pc.n; i += gl_WorkGroupSize.x) {
        float v = x[r * pc.stride + i];
        if (v > best || bi == 0xFFFFFFFFu && v == best) { best = v; bi = i; }
    }
    uint w = wg_argmax(best, bi);
    if (lid == 0) o[r] = w;
}
