#version 450
// The sum of a split-K product's slices (matmul_tiled.comp, matmul_coop.comp with pc.ksteps > 0):
// y[t, y_off + r] (+)= sum_s parts[s * part_stride + t * rows + r] (+ bias[b_off + r]), the slices
// added in order (the same result on every run). Grid: x*z covers rows * T / WG.
layout(local_size_x_id = 0) in;
layout(binding = 0) readonly buffer PB { float parts[]; };  // (slices, T, rows) f32
layout(binding = 1) readonly buffer BB { float bias[]; };   // (b_off + rows) f32, read when flags & 1
layout(binding = 2) buffer YB { float y[]; };               // (T, y_stride) f32
layout(push_constant) uniform PC {
    uint rows; uint T; uint slices; uint part_stride; uint y_stride; uint y_off; uint b_off; uint flags;
} pc;

void main() {
    uint i = (gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x) * gl_WorkGroupSize.x + gl_LocalInvocationID.x;
    if (i >= pc.rows * pc.T) return;
    uint t = i / pc.rows, r = i % pc.rows;
    float s = parts[i];
    for (uint k = 1; k < pc.slices; k++) s += parts[k * pc.part_stride + i];
    if ((pc.flags & 1u) != 0u) s += bias[pc.b_off + r];
    uint idx = t * pc.y_stride + pc.y_off + r;
    if ((pc.flags & 2u) != 0u) s += y[idx];
    y[idx] = s;
}
