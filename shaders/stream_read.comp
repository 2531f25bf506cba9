#version 450
// The device's read bandwidth: every invocation streams 16-byte words of `data` in a grid-stride
// loop with NU loads in flight, folds them into one word (xor, so nothing can be skipped) and
// each workgroup writes one word. Only for measuring (tools/bench_gpu.py), never in a model.
// Grid: x = workgroups (a few per SM); n16 = words to read.
layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint NU = 4;

layout(binding = 0) readonly buffer DB { uvec4 data[]; };
layout(binding = 1) writeonly buffer OB { uint out_words[]; };

layout(push_constant) uniform PC { uint n16; } pc;

shared uint folded[gl_WorkGroupSize.x];

void main() {
    uint lid = gl_LocalInvocationID.x;
    uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    uvec4 acc = uvec4(0);
    for (uint i = gl_GlobalInvocationID.x; i < pc.n16; i += stride * NU) {
        uvec4 v[NU];
        for (uint j = 0; j < NU; j++) v[j] = data[min(i + j * stride, pc.n16 - 1u)];
        for (uint j = 0; j < NU; j++) acc ^= i + j * stride < pc.n16 ? v[j] : uvec4(0);
    }
    folded[lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
    barrier();
    if (lid == 0) {
        uint f = 0;
        for (uint i = 0; i < gl_WorkGroupSize.x; i++) f ^= folded[i];
        out_words[gl_WorkGroupID.x] = f;
    }
}
