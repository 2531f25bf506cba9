#version 450
// Element-wise ops without weights: MODE 0 scale, y = c * x (gemma's embedding scale, granite's
// multipliers); MODE 1 soft-cap, y = c * tanh(x / c) (gemma2's final logits). Grid: x*z covers n / WG.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;
layout(binding = 0) readonly buffer XB { float x[]; };    // (n) f32
layout(binding = 1) writeonly buffer YB { float y[]; };   // (n) f32, may alias x
layout(push_constant) uniform PC { uint n; uint mode; float c; } pc;

void main() {
    uint i = (gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x) * gl_WorkGroupSize.x + gl_LocalInvocationID.x;
    if (i >= pc.n) return;
    float v = x[i];
    y[i] = pc.mode == 0u ? pc.c * v : pc.c * tanh(clamp(v / pc.c, -15.0, 15.0));
}
