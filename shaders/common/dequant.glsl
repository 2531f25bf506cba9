// Dequantize one "unit" (UNIT consecutive elements of a weight row) into vec4 wv[UNIT / 4].
// Include after defining WTYPE (a T_* code from types.glsl) and W_BINDING.
// Every type is decoded with ggml's formulas (dequantize_row_<type>), in f32.
// The weight binding is viewed three ways: u16 (blocks of 18/22/34/110/210 bytes are only 2-aligned),
// u32 and uvec4 (for 16-aligned data: F32/F16/BF16 rows with cols % UNIT == 0, Q4_K/Q5_K super-blocks).
// `rb` is the byte offset of the row's first block, relative to the start of the binding; it must be a
// multiple of 16 for F32/F16/BF16/Q4_K/Q5_K, of 4 for Q5_1/Q2_K/IQ4_XS (blocks of 24/84/136 bytes: true
// of every row whose weight starts 16-aligned) and of 2 for the rest.
#extension GL_EXT_shader_16bit_storage : require

#ifndef W_ARRAY   // moe_matvec.comp declares w16/w32/w128 itself, over an array of buffers
layout(binding = W_BINDING) readonly buffer WU16 { uint16_t w16[]; };   // raw bytes, 2 at a time
layout(binding = W_BINDING) readonly buffer WU32 { uint w32[]; };       // raw bytes, 4 at a time
layout(binding = W_BINDING) readonly buffer WU128 { uvec4 w128[]; };    // raw bytes, 16 at a time
#endif

// UNIT: elements one load_unit() call yields, as U4 vec4s; wv[k] holds elements unit_x(u, k) .. +3 of
// the row. Units are small (8-16 elements for blocks) so that neighbouring invocations read neighbouring
// bytes (coalesced). The units of one SPAN-element window are numbered consecutively and cover it.
#if WTYPE == T_F32
const uint BLOCK = 1, BLOCK_BYTES = 4, UNIT = 4, SPAN = 4;
#elif WTYPE == T_F16 || WTYPE == T_BF16
const uint BLOCK = 1, BLOCK_BYTES = 2, UNIT = 8, SPAN = 8;
#elif WTYPE == T_Q4_0
const uint BLOCK = 32, BLOCK_BYTES = 18, UNIT = 8, SPAN = 32;
#elif WTYPE == T_Q4_1
const uint BLOCK = 32, BLOCK_BYTES = 20, UNIT = 8, SPAN = 32;
#elif WTYPE == T_Q8_0
const uint BLOCK = 32, BLOCK_BYTES = 34, UNIT = 8, SPAN = 8;
#elif WTYPE == T_Q4_K
const uint BLOCK = 256, BLOCK_BYTES = 144, UNIT = 16, SPAN = 64;
#elif WTYPE == T_Q6_K
const uint BLOCK = 256, BLOCK_BYTES = 210, UNIT = 16, SPAN = 16;
#elif WTYPE == T_Q5_0
const uint BLOCK = 32, BLOCK_BYTES = 22, UNIT = 8, SPAN = 32;
#elif WTYPE == T_Q5_1
const uint BLOCK = 32, BLOCK_BYTES = 24, UNIT = 8, SPAN = 32;
#elif WTYPE == T_Q5_K
const uint BLOCK = 256, BLOCK_BYTES = 176, UNIT = 16, SPAN = 64;
#elif WTYPE == T_Q3_K
const uint BLOCK = 256, BLOCK_BYTES = 110, UNIT = 16, SPAN = 16;
#elif WTYPE == T_Q2_K
const uint BLOCK = 256, BLOCK_BYTES = 84, UNIT = 16, SPAN = 16;
#elif WTYPE == T_IQ4_NL
const uint BLOCK = 32, BLOCK_BYTES = 18, UNIT = 8, SPAN = 32;
#elif WTYPE == T_IQ4_XS
const uint BLOCK = 256, BLOCK_BYTES = 136, UNIT = 8, SPAN = 32;
#else
#error unknown WTYPE
#endif
const uint U4 = UNIT / 4;
// NIBBLE_UNITS: Q4_0-shaped units (8 elements: the low nibbles of 4 bytes of a 16-byte run, then their
// high nibbles 16 elements later), so wv[0] and wv[1] are not one run of 8 (matmul_coop pairs units).
#if WTYPE == T_Q4_0 || WTYPE == T_Q4_1 || WTYPE == T_Q5_0 || WTYPE == T_Q5_1 || WTYPE == T_IQ4_NL || \
    WTYPE == T_IQ4_XS
#define NIBBLE_UNITS 1
#else
#define NIBBLE_UNITS 0
#endif

float half_at(uint h) { return unpackHalf2x16(uint(w16[h])).x; }   // f16 at u16 index h

// byte b of the u32 word at byte offset `wb` (multiple of 4)
uint byte_of(uint wb, uint b) { return (w32[(wb + b) >> 2] >> (8u * ((wb + b) & 3u))) & 0xFFu; }

// byte b of the data from u16 index h on (any b)
uint byte_at(uint h, uint b) { return (uint(w16[h + (b >> 1)]) >> (8u * (b & 1u))) & 0xFFu; }

// two u16 at u16 index h, h+1 as one uint (little endian)
uint u32_at(uint h) { return uint(w16[h]) | (uint(w16[h + 1]) << 16); }

// the four bytes of a, each shifted right by s and masked to m
uvec4 bytes_bits(uint a, uint s, uint m) { return (uvec4(a, a >> 8, a >> 16, a >> 24) >> s) & m; }

#if WTYPE == T_IQ4_NL || WTYPE == T_IQ4_XS
// IQ4_NL/IQ4_XS: ggml's kvalues_iq4nl, indexed by the nibbles of a's four bytes (low nibbles; a >> 4: high)
const float KVALUES_IQ4NL[16] = float[16](-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
                                          1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0);
vec4 iq4_values(uint a) {
    return vec4(KVALUES_IQ4NL[a & 15u], KVALUES_IQ4NL[(a >> 8) & 15u], KVALUES_IQ4NL[(a >> 16) & 15u],
                KVALUES_IQ4NL[(a >> 24) & 15u]);
}
#endif

// Codes to floats without int->float conversions, which GPUs issue at a fraction of the FMA rate
// (NVIDIA: a quarter of the FMA rate or less): 2^23 + v is v's bits under the exponent of 2^23, so
// or-ing v in and subtracting 2^23 is exact for every v < 2^23 (one logic op and one add). `bias` is
// subtracted in the same add (exact: the codes' biases are small integers).
const uint MAGIC_BITS = 0x4B000000u;   // 2^23 as f32
const float MAGIC = 8388608.0;
float code_f(uint v, float bias) { return uintBitsToFloat(v | MAGIC_BITS) - (MAGIC + bias); }
vec4 codes_f(uvec4 v, float bias) { return uintBitsToFloat(v | MAGIC_BITS) - (MAGIC + bias); }
// the low byte of b as a signed int8 (flipping bit 7 makes b + 128 unsigned)
float int8_f(uint b) { return code_f((b & 0xFFu) ^ 0x80u, 128.0); }

vec4 lo_nibbles(uint a) { return codes_f(bytes_bits(a, 0u, 15u), 0.0); }
vec4 hi_nibbles(uint a) { return codes_f(bytes_bits(a, 4u, 15u), 0.0); }

// Row element of wv[k]'s first value.
uint unit_x(uint u, uint k) {
#if NIBBLE_UNITS
    return (u >> 2) * 32u + 4u * (u & 3u) + 16u * k;        // k = 0 low nibbles, k = 1 high nibbles
#elif WTYPE == T_Q4_K || WTYPE == T_Q5_K
    return (u >> 2) * 64u + 8u * (u & 3u) + 4u * (k & 1u) + 32u * (k >> 1);
#else
    return u * UNIT + 4u * k;
#endif
}

#if WTYPE == T_Q4_K || WTYPE == T_Q5_K
// Q4_K/Q5_K: d * scale and dmin * min of sub-blocks 2p and 2p+1 of the super-block at byte sb (ggml's
// get_scale_min_k4 on the 12 bytes s0 s1 s2 after d and dmin), from one 16-byte load and without
// branches (a branch on p splits a subgroup's lanes): sub-block j < 4 has scale s0[j] & 63, min s1[j] & 63;
// j >= 4 takes 4 bits from s2[j - 4] and its 2 high bits from the top of s0[j - 4] (scale), s1[j - 4] (min).
void k4_scales(uint sb, uint p, out float d0, out float o0, out float d1, out float o1) {
    uvec4 hdr = w128[sb >> 4];                 // d | dmin << 16, s0, s1, s2
    vec2 dd = unpackHalf2x16(hdr.x);
    uint sc = p < 2u ? hdr.y & 0x3F3F3F3Fu : (hdr.w & 0x0F0F0F0Fu) | ((hdr.y >> 2) & 0x30303030u);
    uint mn = p < 2u ? hdr.z & 0x3F3F3F3Fu : ((hdr.w >> 4) & 0x0F0F0F0Fu) | ((hdr.z >> 2) & 0x30303030u);
    uint sh = 16u * (p & 1u);                  // bytes 2p, 2p+1 (mod 4) of the words
    d0 = dd.x * code_f((sc >> sh) & 0xFFu, 0.0); o0 = dd.y * code_f((mn >> sh) & 0xFFu, 0.0);
    d1 = dd.x * code_f((sc >> (sh + 8u)) & 0xFFu, 0.0); o1 = dd.y * code_f((mn >> (sh + 8u)) & 0xFFu, 0.0);
}
#endif

void load_unit(uint rb, uint u, out vec4 wv[U4]) {
#if WTYPE == T_F32
    wv[0] = uintBitsToFloat(w128[(rb >> 4) + u]);
#elif WTYPE == T_F16
    uvec4 q = w128[(rb >> 4) + u];
    wv[0] = vec4(unpackHalf2x16(q.x), unpackHalf2x16(q.y));
    wv[1] = vec4(unpackHalf2x16(q.z), unpackHalf2x16(q.w));
#elif WTYPE == T_BF16
    uvec4 q = w128[(rb >> 4) + u];
    wv[0] = uintBitsToFloat(uvec4(q.x << 16, q.x & 0xFFFF0000u, q.y << 16, q.y & 0xFFFF0000u));
    wv[1] = uintBitsToFloat(uvec4(q.z << 16, q.z & 0xFFFF0000u, q.w << 16, q.w & 0xFFFF0000u));
#elif WTYPE == T_Q8_0
    // block (34 B): f16 d, int8 q[32]; value = q * d. Unit u = elements 8(u%4) .. +7 of block u/4.
    uint h = (rb + (u >> 2) * 34u) >> 1, qh = h + 1u + 4u * (u & 3u);
    float d = half_at(h);
    // (8-bit ints to floats: the conversion, not the 2^23 trick, which measured 10 % slower for Q8_0 on an H200)
    for (uint k = 0; k < 2; k++) {
        int a = int(u32_at(qh + 2u * k));
        wv[k] = vec4(bitfieldExtract(a, 0, 8), bitfieldExtract(a, 8, 8), bitfieldExtract(a, 16, 8),
                     bitfieldExtract(a, 24, 8)) * d;
    }
#elif WTYPE == T_Q4_0 || WTYPE == T_Q4_1
    // Q4_0 (18 B): f16 d, 16 bytes of nibbles; byte j: low nibble = element j, high = element j + 16;
    // value (q - 8) * d. Q4_1 (20 B): f16 d, f16 m, nibbles; value q * d + m.
    // Unit u = bytes 4(u%4) .. +3 of block u/4: elements 4(u%4).. (low) and 16 + 4(u%4).. (high).
#if WTYPE == T_Q4_0
    uint h = (rb + (u >> 2) * 18u) >> 1;
    float d = half_at(h), m = -8.0 * d;
    uint a = u32_at(h + 1u + 2u * (u & 3u));
#else
    uint h = (rb + (u >> 2) * 20u) >> 1;
    float d = half_at(h), m = half_at(h + 1u);
    uint a = u32_at(h + 2u + 2u * (u & 3u));
#endif
    wv[0] = lo_nibbles(a) * d + m;
    wv[1] = hi_nibbles(a) * d + m;
#elif WTYPE == T_Q4_K || WTYPE == T_Q5_K
    // Q4_K super-block (144 B): f16 d, f16 dmin, 12 B packed 6-bit scales/mins, 128 B nibbles qs.
    // Sub-blocks 2p and 2p+1 (32 elements each) share qs[32p .. 32p+31]: low nibbles -> 2p, high -> 2p+1;
    // value = d * sc * q - dmin * m. Unit u = qs bytes 32p + 8r .. +7 with p = (u/4)%4, r = u%4.
    // Q5_K (176 B): d, dmin, scales as Q4_K, then qh[32], then qs[128]; q gets bit s of qh[l] (sub-block s,
    // l = element % 32) as its bit 4.
    uint sb = rb + (u >> 4) * BLOCK_BYTES, p = (u >> 2) & 3u, r = u & 3u;
    float d0, o0, d1, o1;
    k4_scales(sb, p, d0, o0, d1, o1);
#if WTYPE == T_Q4_K
    uint qw = (sb + 16u + 32u * p + 8u * r) >> 2;
    uint a = w32[qw], b = w32[qw + 1u];
    wv[0] = lo_nibbles(a) * d0 - o0;      // elements 64p + 8r .. +3
    wv[1] = lo_nibbles(b) * d0 - o0;      //          64p + 8r + 4 .. +7
    wv[2] = hi_nibbles(a) * d1 - o1;      //          64p + 32 + 8r ..
    wv[3] = hi_nibbles(b) * d1 - o1;
#else
    uint qw = (sb + 48u + 32u * p + 8u * r) >> 2, hw = (sb + 16u + 8u * r) >> 2;
    uint a = w32[qw], b = w32[qw + 1u], ha = w32[hw], hb = w32[hw + 1u];
    wv[0] = codes_f(bytes_bits(a, 0u, 15u) | (bytes_bits(ha, 2u * p, 1u) << 4), 0.0) * d0 - o0;
    wv[1] = codes_f(bytes_bits(b, 0u, 15u) | (bytes_bits(hb, 2u * p, 1u) << 4), 0.0) * d0 - o0;
    wv[2] = codes_f(bytes_bits(a, 4u, 15u) | (bytes_bits(ha, 2u * p + 1u, 1u) << 4), 0.0) * d1 - o1;
    wv[3] = codes_f(bytes_bits(b, 4u, 15u) | (bytes_bits(hb, 2u * p + 1u, 1u) << 4), 0.0) * d1 - o1;
#endif
#elif WTYPE == T_Q6_K
    // super-block (210 B): ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16], f16 d.
    // element e = 128h + 32k + l (h 0..1, k 0..3, l 0..31):
    //   q = ((ql[64h + 32(k&1) + l] >> 4(k>>1)) & 15) | (((qh[32h + l] >> 2k) & 3) << 4)
    //   value = d * scales[e / 16] * (q - 32)
    // Unit u = 16 consecutive elements: super-block u/16, (h, k) = (u/2)%8, l from 16(u%2).
    uint hb = (rb + (u >> 4) * 210u) >> 1;    // u16 index of the super-block (210 is even)
    uint hk = (u >> 1) & 7u, hh = hk >> 2, k = hk & 3u, l0 = 16u * (u & 1u);
    uint sw = uint(w16[hb + 96u + 4u * hh + k]);              // scales 8h + 2k (low byte), 8h + 2k + 1
    float ds = half_at(hb + 104u) * int8_f(sw >> (8u * (u & 1u)));
    uint qlh = hb + 32u * hh + 16u * (k & 1u) + (l0 >> 1), qhh = hb + 64u + 16u * hh + (l0 >> 1);
    uint lsh = 4u * (k >> 1), hsh = 2u * k;
    for (uint i = 0; i < 4; i++) {
        uint l = u32_at(qlh + 2u * i), g = u32_at(qhh + 2u * i);
        uvec4 lo = (uvec4(l, l >> 8, l >> 16, l >> 24) >> lsh) & 15u;
        uvec4 hi = (uvec4(g, g >> 8, g >> 16, g >> 24) >> hsh) & 3u;
        wv[i] = codes_f(lo | (hi << 4), 32.0) * ds;
    }
#elif WTYPE == T_Q5_0 || WTYPE == T_Q5_1
    // Q5_0 (22 B): f16 d, u32 qh, 16 bytes of nibbles as Q4_0; q = nibble | (bit e of qh) << 4 for element
    // e of the block; value (q - 16) * d. Q5_1 (24 B): f16 d, f16 m, u32 qh, nibbles; value q * d + m.
    // Units as Q4_0's: elements 4r .. 4r+3 (low nibbles) and 16 + 4r .. (high), r = u % 4.
    uint r = u & 3u;
#if WTYPE == T_Q5_0
    uint h = (rb + (u >> 2) * 22u) >> 1;
    float d = half_at(h);
    uint qh = u32_at(h + 1u), a = u32_at(h + 3u + 2u * r);
#else
    uint wb = (rb + (u >> 2) * 24u) >> 2;
    vec2 dm = unpackHalf2x16(w32[wb]);
    float d = dm.x, m = dm.y;
    uint qh = w32[wb + 1u], a = w32[wb + 2u + r];
#endif
    uvec4 e = uvec4(0u, 1u, 2u, 3u) + 4u * r;
#if WTYPE == T_Q5_0
    const float bias = 16.0;
#else
    const float bias = 0.0;
#endif
    vec4 q0 = codes_f(bytes_bits(a, 0u, 15u) | (((uvec4(qh) >> e) & 1u) << 4), bias);
    vec4 q1 = codes_f(bytes_bits(a, 4u, 15u) | (((uvec4(qh) >> (e + 16u)) & 1u) << 4), bias);
#if WTYPE == T_Q5_0
    wv[0] = q0 * d;
    wv[1] = q1 * d;
#else
    wv[0] = q0 * d + m;
    wv[1] = q1 * d + m;
#endif
#elif WTYPE == T_Q2_K || WTYPE == T_Q3_K
    // Element e = 128h + 32j + l (h 0..1, j 0..3, l 0..31) is 2 bits of qs[32h + l] at bit 2j; scale e / 16.
    // Q2_K (84 B): u8 scales[16] (low nibble scale, high nibble min), qs[64], f16 d, f16 dmin;
    //   value = d * (sc & 15) * q - dmin * (sc >> 4).
    // Q3_K (110 B): hmask[32], qs[64], 12 B of 16 six-bit scales (minus 32), f16 d;
    //   value = d * scale * (q - (bit 4h + j of hmask[l] set ? 0 : 4)).
    // Unit u = 16 consecutive elements: super-block u/16, i = u % 16 = the scale's index, l from 16(i%2).
    uint i = u & 15u, hh = i >> 3, j = (i >> 1) & 3u, l0 = 16u * (i & 1u);
#if WTYPE == T_Q2_K
    uint sb = rb + (u >> 4) * 84u;
    vec2 dm = unpackHalf2x16(w32[(sb + 80u) >> 2]);
    uint sc = byte_of(sb, i);
    float dl = dm.x * code_f(sc & 15u, 0.0), ml = dm.y * code_f(sc >> 4, 0.0);
    uint qw = (sb + 16u + 32u * hh + l0) >> 2;
    for (uint k = 0; k < 4; k++) wv[k] = dl * codes_f(bytes_bits(w32[qw + k], 2u * j, 3u), 0.0) - ml;
#else
    uint hb = (rb + (u >> 4) * 110u) >> 1;                  // u16 index of the super-block (110 is even)
    // scale i: low 4 bits from byte i % 8 (its high nibble for i >= 8), high 2 from byte 8 + i % 4
    uint lo = (byte_at(hb + 48u, i & 7u) >> (4u * (i >> 3))) & 15u;
    uint hi = (byte_at(hb + 48u, 8u + (i & 3u)) >> (2u * (i >> 2))) & 3u;
    float dl = half_at(hb + 54u) * code_f(lo | (hi << 4), 32.0);
    uint qh = hb + 16u + 16u * hh + (l0 >> 1), mh = hb + (l0 >> 1);   // u16 indices of qs[32h + l0], hmask[l0]
    for (uint k = 0; k < 4; k++) {
        uvec4 q = bytes_bits(u32_at(qh + 2u * k), 2u * j, 3u);
        uvec4 m = bytes_bits(u32_at(mh + 2u * k), 4u * hh + j, 1u);
        wv[k] = dl * codes_f(q + 4u * m, 4.0);
    }
#endif
#elif WTYPE == T_IQ4_NL
    // block (18 B): f16 d, 16 bytes of nibbles as Q4_0; value d * kvalues_iq4nl[q]. Units as Q4_0's.
    uint h = (rb + (u >> 2) * 18u) >> 1;
    float d = half_at(h);
    uint a = u32_at(h + 1u + 2u * (u & 3u));
    wv[0] = d * iq4_values(a);
    wv[1] = d * iq4_values(a >> 4);
#elif WTYPE == T_IQ4_XS
    // super-block (136 B): f16 d, u16 scales_h, u8 scales_l[4], qs[128]; sub-block s (32 elements) is
    // qs[16s .. 16s+15] laid out as an IQ4_NL block, with ls = (scales_l[s/2] >> 4(s%2)) & 15 |
    // ((scales_h >> 2s) & 3) << 4; value (d * (ls - 32)) * kvalues_iq4nl[q]. Unit u: sub-block u/4 of the
    // row (s = (u/4) % 8), bytes 4(u%4) .. +3 of its qs.
    uint sb = rb + (u >> 5) * 136u, s = (u >> 2) & 7u;
    uint w0 = w32[sb >> 2];                                  // d | scales_h << 16
    uint ls = ((byte_of(sb + 4u, s >> 1) >> (4u * (s & 1u))) & 15u) | (((w0 >> (16u + 2u * s)) & 3u) << 4);
    float dl = unpackHalf2x16(w0).x * code_f(ls, 32.0);
    uint a = w32[(sb + 8u + 16u * s + 4u * (u & 3u)) >> 2];
    wv[0] = dl * iq4_values(a);
    wv[1] = dl * iq4_values(a >> 4);
#endif
}

// Bytes of one weight row with `cols` elements.
uint row_bytes(uint cols) { return (cols / BLOCK) * BLOCK_BYTES; }
