#version 450
// kv_store with the rotary embedding of the keys folded in (decode: one dispatch and one barrier
// fewer per layer): k_cache[pos[t]] = rope(k[t], pos[t]), v_cache[pos[t]] = v[t]. The rotation is
// rope.comp's, element for element. ring > 0: a ring cache of `ring` rows, position p at row p % ring. Invocation i of a token owns one pair of one kv head: slots
// s < n_rot/2 are the rotated pairs ("norm": 2s, 2s+1; "neox": s, s + n_rot/2), the rest copy the
// unrotated tail two elements at a time. Grid: x = ceil(kv_dim / 2 / WG), y = T.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x_id = 0) in;

layout(binding = 0) readonly buffer KB { float k[]; };    // (T, k_stride) f32 new keys, not rotated
layout(binding = 1) readonly buffer VB { float v[]; };    // (T, v_stride) f32 new values
#ifdef KV_F16
#extension GL_EXT_shader_16bit_storage : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
layout(binding = 2) buffer KC { float16_t kc[]; };        // (n_ctx, kv_dim) f16
layout(binding = 3) buffer VC { float16_t vc[]; };
#else
layout(binding = 2) buffer KC { float kc[]; };            // (n_ctx, kv_dim) f32
layout(binding = 3) buffer VC { float vc[]; };
#endif
layout(binding = 4) readonly buffer PB { uint pos[]; };   // (T) positions
layout(binding = 5) readonly buffer FB { float ff[]; };   // (n_rot / 2) frequency divisors
#include "common/rope.glsl"

layout(push_constant) uniform PC {
    uint T;
    uint kv_dim;      // n_kv_heads * head_dim
    uint n_ctx;
    uint k_stride;
    uint v_stride;
    uint t0;          // first token row
    uint head_dim;
    uint n_rot;       // rotated dims per head (even, <= head_dim)
    uint mode;        // 0 norm, 1 neox
    uint flags;       // 1: divide frequencies by ff
    float base;
    float freq_scale;
    uint ring;        // > 0: rows in the ring cache (row = position % ring); 0: row = position < n_ctx
} pc;

#ifdef KV_F16
#define STORE(buf, i, x) buf[i] = float16_t(x)
#else
#define STORE(buf, i, x) buf[i] = (x)
#endif

void main() {
    uint i = gl_GlobalInvocationID.x, t = gl_WorkGroupID.y;
    uint half_hd = pc.head_dim / 2u, half_rot = pc.n_rot / 2u;
    if (i >= pc.kv_dim / 2u || t >= pc.T) return;
    t += pc.t0;
    uint p = pos[t];
    if (pc.ring == 0u && p >= pc.n_ctx) return;   // the host checks positions; never write out of bounds
    uint h = i / half_hd, s = i % half_hd, hb = h * pc.head_dim;
    uint i0, i1;
    if (s < half_rot) {
        i0 = pc.mode == 0u ? 2u * s : s;
        i1 = pc.mode == 0u ? i0 + 1u : s + half_rot;
    } else {
        i0 = pc.n_rot + 2u * (s - half_rot);
        i1 = i0 + 1u;
    }
    uint kb = t * pc.k_stride + hb, vb = t * pc.v_stride + hb, o = (pc.ring > 0u ? p % pc.ring : p) * pc.kv_dim + hb;
    float a = k[kb + i0], b = k[kb + i1];
    if (s < half_rot) {
        vec2 r = rope_rotate(a, b, rope_theta(s, p, pc.n_rot, pc.base, pc.freq_scale,
                                              (pc.flags & 1u) != 0u ? ff[s] : 1.0));
        a = r.x;
        b = r.y;
    }
    STORE(kc, o + i0, a);
    STORE(kc, o + i1, b);
    STORE(vc, o + i0, v[vb + i0]);
    STORE(vc, o + i1, v[vb + i1]);
}
