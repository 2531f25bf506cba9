#version 450
// Write the new keys/values of tokens t0..t0+T-1 (rows of k, v and pos) into row pos[t] of the caches.
// t0 lets one batch buffer serve several sequences, each with its own cache. ring > 0: the cache is a
// ring of `ring` rows (a sliding-window layer's, runtime/kv.py), position p at row p % ring.
// KV_F16 defined: caches hold f16 pairs packed in uints, else f32. Grid: x = ceil(kv_dim/2 / WG), y = T.
layout(local_size_x_id = 0) in;

layout(binding = 0) readonly buffer KB { vec2 k2[]; };    // (T, k_stride) f32 new keys
layout(binding = 1) readonly buffer VB { vec2 v2[]; };    // (T, v_stride) f32 new values
#ifdef KV_F16
layout(binding = 2) buffer KC { uint kc[]; };             // (n_ctx, kv_dim) f16
layout(binding = 3) buffer VC { uint vc[]; };             // (n_ctx, kv_dim) f16
#else
layout(binding = 2) buffer KC { vec2 kc[]; };             // (n_ctx, kv_dim) f32
layout(binding = 3) buffer VC { vec2 vc[]; };             // (n_ctx, kv_dim) f32
#endif
layout(binding = 4) readonly buffer PB { uint pos[]; };   // (T) positions

layout(push_constant) uniform PC {
    uint T;
    uint kv_dim;    // n_kv_heads * head_dim (even)
    uint n_ctx;
    uint k_stride;  // floats between tokens in k (even)
    uint v_stride;
    uint t0;        // first token row
    uint ring;      // > 0: rows in the ring cache (row = position % ring); 0: row = position < n_ctx
} pc;

void main() {
    uint i = gl_GlobalInvocationID.x, t = gl_WorkGroupID.y;
    if (2u * i >= pc.kv_dim || t >= pc.T) return;
    t += pc.t0;
    uint p = pos[t];
    if (pc.ring == 0u && p >= pc.n_ctx) return;   // the host checks positions; never write out of bounds
    vec2 kk = k2[(t * pc.k_stride >> 1) + i], vv = v2[(t * pc.v_stride >> 1) + i];
    uint o = ((pc.ring > 0u ? p % pc.ring : p) * pc.kv_dim >> 1) + i;
#ifdef KV_F16
    kc[o] = packHalf2x16(kk);
    vc[o] = packHalf2x16(vv);
#else
    kc[o] = kk;
    vc[o] = vv;
#endif
}
