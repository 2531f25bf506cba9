#version 450
// A mixture of experts' rows (runtime/vk/moe.py): the rows that chose one expert, gathered and added back.
//   mode 0, gather:      dst[i, :n] = src[idx[i], :n]                 (the expert's input rows, packed)
//   mode 1, scatter-add: dst[idx[i], :n] += w[i] * src[i, :n]         (its output, scaled by each row's weight)
//   mode 2, sum:         dst[r, :n] += sum over i < m with idx[i] == r, in order, of w[i] * src[i, :n]
//                        (the batched path's slots, several per row; grid y: the rows r of dst)
//   mode 3, sum by row:  for i < R: r = rows[i], dst[r, :n] += sum over the slots s of row r, in order, of
//                        w[s] * src[s, :n] (the grouped path's chunk of slots); from uint idx_off of route:
//                        R, rows[m], offsets[m + 1] (row i's slots are slot[offsets[i] .. offsets[i + 1]]),
//                        slot[m], w[m] (f32 bits, by slot); grid y covers m >= R
// for i < m (modes 0 and 1). One expert's rows are distinct (a row chooses an expert once): no two
// invocations write one element. Grid: x covers n / WG, y the m rows (mode 2: dst's rows).
layout(local_size_x_id = 0) in;
layout(binding = 0) readonly buffer SB { float src[]; };   // (rows, src_stride) f32
layout(binding = 1) buffer DB { float dst[]; };            // (rows, dst_stride) f32
layout(binding = 2) readonly buffer RB { uint route[]; };  // idx (m) uint32 at idx_off, w (m) f32 bits at w_off
layout(push_constant) uniform PC {
    uint m; uint n; uint src_stride; uint dst_stride; uint idx_off; uint w_off; uint mode;
} pc;

void main() {
    uint c = gl_GlobalInvocationID.x;
    uint i = gl_WorkGroupID.y;
    if (pc.mode == 3u) {
        uint b = pc.idx_off;
        if (c >= pc.n || i >= route[b]) return;
        uint r = route[b + 1u + i];
        uint a0 = route[b + 1u + pc.m + i], a1 = route[b + 2u + pc.m + i];
        float acc = dst[r * pc.dst_stride + c];
        for (uint a = a0; a < a1; a++) {
            uint s = route[b + 2u + 2u * pc.m + a];
            acc += uintBitsToFloat(route[b + 2u + 3u * pc.m + s]) * src[s * pc.src_stride + c];
        }
        dst[r * pc.dst_stride + c] = acc;
        return;
    }
    if (pc.mode == 2u) {
        if (c >= pc.n) return;
        float acc = dst[i * pc.dst_stride + c];
        for (uint j = 0; j < pc.m; j++)
            if (route[pc.idx_off + j] == i) acc += uintBitsToFloat(route[pc.w_off + j]) * src[j * pc.src_stride + c];
        dst[i * pc.dst_stride + c] = acc;
        return;
    }
    if (c >= pc.n || i >= pc.m) return;
    uint r = route[pc.idx_off + i];
    if (pc.mode == 0u) {
        dst[i * pc.dst_stride + c] = src[r * pc.src_stride + c];
    } else {
        uint o = r * pc.dst_stride + c;
        dst[o] = dst[o] + uintBitsToFloat(route[pc.w_off + i]) * src[i * pc.src_stride + c];
    }
}
