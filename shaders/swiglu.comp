#version 450
// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u. Grid: x*z covers n / WG.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;
layout(binding = 0) readonly buffer GB { float g[]; };    // (n) f32
layout(binding = 1) readonly buffer UB { float u[]; };    // (n) f32
layout(binding = 2) writeonly buffer OB { float o[]; };   // (n) f32, may alias g or u
layout(push_constant) uniform PC { uint n; } pc;

void main() {
    uint i = (gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x) * gl_WorkGroupSize.x + gl_LocalInvocationID.x;
    if (i >= pc.n) return;
    float a = g[i];
    o[i] = a / (1.0 + exp(-a)) * u[i];
}
