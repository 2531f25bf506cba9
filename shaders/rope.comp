#version 450
// Rotary position embedding in place on x (T, n_heads * head_dim), positions from a buffer so a
// recorded command buffer can be replayed for new positions.
// theta_i = pos[t] * freq_scale * base^(-2i / n_rot) / ff[i]   (ff only when flags & 1: llama3 factors;
// common/rope.glsl)
// mode 0 ("norm", GGUF llama): rotate pairs (2i, 2i+1); mode 1 ("neox"): pairs (i, i + n_rot/2).
// Dims n_rot..head_dim-1 are left as they are. Grid: x = ceil(n_heads * n_rot/2 / WG), y = T.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;
#include "common/rope.glsl"

layout(binding = 0) buffer XB { float x[]; };             // (T, stride) f32, heads at h * head_dim
layout(binding = 1) readonly buffer PB { uint pos[]; };   // (T) positions
layout(binding = 2) readonly buffer FB { float ff[]; };   // (n_rot / 2) frequency divisors

layout(push_constant) uniform PC {
    uint T;
    uint n_heads;
    uint head_dim;
    uint n_rot;       // rotated dims (even, <= head_dim)
    uint stride;      // floats between tokens
    uint mode;        // 0 norm, 1 neox
    uint flags;       // 1: divide frequencies by ff
    float base;
    float freq_scale;
} pc;

void main() {
    uint half_rot = pc.n_rot / 2;
    uint gid = gl_GlobalInvocationID.x, t = gl_WorkGroupID.y;
    if (gid >= pc.n_heads * half_rot || t >= pc.T) return;
    uint h = gid / half_rot, i = gid % half_rot;
    float theta = rope_theta(i, pos[t], pc.n_rot, pc.base, pc.freq_scale, (pc.flags & 1u) != 0u ? ff[i] : 1.0);
    uint b = t * pc.stride + h * pc.head_dim;
    uint i0 = pc.mode == 0u ? b + 2u * i : b + i;
    uint i1 = pc.mode == 0u ? i0 + 1u : i0 + half_rot;
    vec2 r = rope_rotate(x[i0], x[i1], theta);
    x[i0] = r.x;
    x[i1] = r.y;
}
