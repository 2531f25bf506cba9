#version 450
// y[g, i] = x[g, i] / sqrt(mean_i(x[g, :]^2) + eps) * (w[i] + offset) for groups g of `n` elements:
// n = hidden size for a layer norm, n = head_dim for per-head q/k norms (qwen3). In place if y == x.
// Grid: x*z = n_groups, one workgroup per group.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;
#include "common/reduce.glsl"

layout(binding = 0) readonly buffer XB { float x[]; };    // (n_groups, n) f32
layout(binding = 1) readonly buffer WB { float w[]; };    // (n) f32
layout(binding = 2) buffer YB { float y[]; };             // (n_groups, n) f32

layout(push_constant) uniform PC {
    uint n_groups;
    uint n;
    float eps;
    float offset;   // added to w (gemma's HF weights store w - 1)
} pc;

void main() {
    uint g = group_index();
    if (g >= pc.n_groups) return;
    uint lid = gl_LocalInvocationID.x, base = g * pc.n;
    float ss = 0.0;
    for (uint i = lid; i < pc.n; i += gl_WorkGroupSize.x) { float v = x[base + i]; ss += v * v; }
    ss = wg_sum(ss);
    float scale = inversesqrt(ss / float(pc.n) + pc.eps);
    for (uint i = lid; i < pc.n; i += gl_WorkGroupSize.x) y[base + i] = x[base + i] * scale * (w[i] + pc.offset);
}
