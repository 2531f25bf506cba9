#version 450
// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u; with GELU defined (geglu), gelu(g[i]) * u[i] in
// gelu's tanh form. Grid: x*z covers n / WG.
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
#ifdef GELU
    float inner = clamp(0.7978845608 * (a + 0.044715 * a * a * a), -15.0, 15.0);   // tanh saturates by 15
    o[i] = 0.5 * a * (1.0 + tanh(inner)) * u[i];
#else
    o[i] = a / (1.0 + exp(-a)) * u[i];
#endif
}
