#version 450
// out[i] = a[i] + b[i] (residual add; out may alias a). Grid: x*z covers n / WG.
layout(local_size_x_id = 0) in;
layout(binding = 0) readonly buffer AB { float a[]; };    // (n) f32
layout(binding = 1) readonly buffer BB { float b[]; };    // (n) f32
layout(binding = 2) writeonly buffer OB { float o[]; };   // (n) f32
layout(push_constant) uniform PC { uint n; } pc;

void main() {
    uint i = (gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x) * gl_WorkGroupSize.x + gl_LocalInvocationID.x;
    if (i >= pc.n) return;
    o[i] = a[i] + b[i];
}
