#version 450
// Decode matrix-vector product for K-quant rows (Q4_K, Q6_K), a sub-block at a time:
// y[t, y_off + r] (+)= sum_c x[t, c] * W[r, c] (+ bias[b_off + r]).
// matmul.comp dequantizes each element (scale * code - min) and then multiplies it by x; here a lane
// sums x * code per sub-block of its chunk and applies the sub-block's scale (and its min, times the sum
// of x) once. Codes become floats by the 2^23 trick (common/dequant.glsl), and the chunk's x is loaded
// once for the NR rows a subgroup computes together. Subgroup reductions only, no shared memory and no
// barriers (as matvec.comp).
// Grid: x*z = ceil(rows / RPW), y = T (one token per workgroup row).
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;                // WG: invocations per workgroup (a multiple of the subgroup)
layout(constant_id = 1) const uint NR = 2;     // rows a subgroup computes at once (each x load serves all)
layout(constant_id = 2) const uint RPW = 8;    // rows per workgroup (a multiple of NR); subgroups take turns
layout(constant_id = 3) const uint NC = 1;     // chunks a lane works on per loop step (loads in flight)

#define W_BINDING 0
#include "common/dequant.glsl"

#include "common/subgroup_rows.glsl"     // pc.cols: a multiple of 256; pc.w_off: of 16 (Q4_K)

// A super-block is shared by 8 lanes: lane j takes bytes 4j .. 4j+3 of each of its runs of 32 code bytes,
// so that neighbouring lanes read neighbouring bytes of the weights and neighbouring vec4s of x (one
// 128-byte line per 8 lanes and load). Its chunk: xv[k] = x[32k + 4j .. +3], k = 0..7, one scale each.
const uint CHUNKS = 8, XV = 8;
#if WTYPE == T_Q4_K
// Q4_K: qs[32p + l] holds element l of sub-block 2p (low nibble) and of 2p + 1 (high); 8 scales and mins
// (k4_scales' layout) for the sub-blocks k = 0..7.
#elif WTYPE == T_Q6_K
// Q6_K: element 128h + 32g + l (vec4 k = 4h + g) is ql[64h + 32(g % 2) + l] (low nibble for g < 2, high
// for g >= 2) with bits 2g of qh[32h + l] on top, minus 32, times scales[8h + 2g + l / 16] and d.
#else
#error matvec_k.comp: Q4_K or Q6_K only
#endif

// sum over the chunk of x * W for the super-block at byte sb, given the chunk's x and its vec4 sums sx
float chunk_dot(uint sb, uint j, vec4 xv[XV], vec4 sx[2]) {
#if WTYPE == T_Q4_K
    uvec4 hdr = w128[sb >> 4];                 // d | dmin << 16, then the 12 scale bytes s0 s1 s2
    vec2 dd = unpackHalf2x16(hdr.x);
    vec4 sc0 = codes_f(bytes_bits(hdr.y, 0u, 63u), 0.0), mn0 = codes_f(bytes_bits(hdr.z, 0u, 63u), 0.0);
    vec4 sc1 = codes_f(bytes_bits(hdr.w, 0u, 15u) | (bytes_bits(hdr.y, 6u, 3u) << 4), 0.0);
    vec4 mn1 = codes_f(bytes_bits(hdr.w, 4u, 15u) | (bytes_bits(hdr.z, 6u, 3u) << 4), 0.0);
    uint qw = (sb + 16u + 4u * j) >> 2;
    vec4 s0, s1;                               // x . codes of sub-blocks 0..3 and 4..7
    for (uint p = 0; p < 4; p++) {
        uint a = w32[qw + 8u * p];
        float lo = dot(codes_f(bytes_bits(a, 0u, 15u), 0.0), xv[2u * p]);
        float hi = dot(codes_f(bytes_bits(a, 4u, 15u), 0.0), xv[2u * p + 1u]);
        if (p < 2u) { s0[2u * p] = lo; s0[2u * p + 1u] = hi; } else { s1[2u * p - 4u] = lo; s1[2u * p - 3u] = hi; }
    }
    return dd.x * (dot(sc0, s0) + dot(sc1, s1)) - dd.y * (dot(mn0, sx[0]) + dot(mn1, sx[1]));
#else
    uint hb = sb >> 1;                         // u16 index of the super-block (210 is even)
    float r = 0.0;
    for (uint h = 0; h < 2; h++) {
        uint a = u32_at(hb + 32u * h + 2u * j), b = u32_at(hb + 32u * h + 16u + 2u * j);
        uint g = u32_at(hb + 64u + 16u * h + 2u * j);
        // scales 8h + 2g + j / 4 for g = 0..3: bytes j / 4 and 2 + j / 4 of the two words at 192 + 8h
        uint w0 = u32_at(hb + 96u + 4u * h), w1 = u32_at(hb + 98u + 4u * h), sh = 8u * (j >> 2);
        r += int8_f(w0 >> sh) * dot(codes_f(bytes_bits(a, 0u, 15u) | (bytes_bits(g, 0u, 3u) << 4), 32.0), xv[4u * h])
           + int8_f(w0 >> (sh + 16u)) * dot(codes_f(bytes_bits(b, 0u, 15u) | (bytes_bits(g, 2u, 3u) << 4), 32.0),
                                            xv[4u * h + 1u])
           + int8_f(w1 >> sh) * dot(codes_f(bytes_bits(a, 4u, 15u) | (bytes_bits(g, 4u, 3u) << 4), 32.0),
                                    xv[4u * h + 2u])
           + int8_f(w1 >> (sh + 16u)) * dot(codes_f(bytes_bits(b, 4u, 15u) | (bytes_bits(g, 6u, 3u) << 4), 32.0),
                                            xv[4u * h + 3u]);
    }
    return half_at(hb + 104u) * r;
#endif
}

void rows_at(uint r0, uint t) {
    uint lane = gl_SubgroupInvocationID, S = gl_SubgroupSize;
    uint rbytes = row_bytes(pc.cols), chunks = (pc.cols / BLOCK) * CHUNKS, xb = t * pc.x_stride;
    uint rb[NR];
    for (uint r = 0; r < NR; r++) rb[r] = pc.w_off + min(r0 + r, pc.rows - 1u) * rbytes;
    float acc[NR];
    for (uint r = 0; r < NR; r++) acc[r] = 0.0;

    for (uint c0 = lane; c0 < chunks; c0 += S * NC) {
        for (uint q = 0; q < NC; q++) {
            uint c = min(c0 + q * S, chunks - 1u), i = c / CHUNKS, j = c % CHUNKS, x0 = xb + i * BLOCK;
            float keep = c0 + q * S < chunks ? 1.0 : 0.0;   // a clamped chunk counts nothing
            vec4 xv[XV];
            for (uint k = 0; k < XV; k++) xv[k] = x4[(x0 + 32u * k + 4u * j) >> 2];
            vec4 sx[2];                         // Q4_K: sums of the sub-blocks' x (times their mins)
            for (uint k = 0; k < 4; k++) {
                sx[0][k] = dot(xv[k], vec4(1.0));
                sx[1][k] = dot(xv[k + 4u], vec4(1.0));
            }
            for (uint r = 0; r < NR; r++) acc[r] += keep * chunk_dot(rb[r] + i * BLOCK_BYTES, j, xv, sx);
        }
    }
    for (uint r = 0; r < NR; r++) {
        float s = subgroupAdd(acc[r]);
        if (lane == 0) store_row(t, r0 + r, s);
    }
}
