#version 450
// Tensor-core matmul for prefill (VK_NV_cooperative_matrix): y[t, y_off + r] (+)= sum_c x[t, c] * W[r, c]
// (+ bias[b_off + r]). Same push constants, bindings and grid as matmul_tiled.comp.
// A workgroup of WM x WN subgroups computes a BM-row x BN-token tile; each subgroup a (BM/WM) x (BN/WN)
// block as 16x16 fp32 accumulators (fp16 x fp16 products). Per K step of BK, the W tile (dequantized)
// and the x tile are packed to f16 into shared memory; the next step's global loads go to registers
// while this step multiplies (two shared buffers, one barrier per step). Results are staged per
// subgroup through shared memory so that partial tiles, bias and accumulate are handled per element.
// Split-K as matmul_tiled.comp (pc.ksteps, pc.part_stride): few workgroups (decode batches, short
// prefills) leave the SMs latency-bound, so K is cut into slices that run side by side.
// Shared tiles are uvec4 arrays (8 halves each; coopMatLoadNV offsets and strides count uvec4s).
#extension GL_GOOGLE_include_directive : require
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_control_flow_attributes : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;                // WG = WM * WN * subgroup size
layout(constant_id = 1) const uint BM = 128;   // multiple of 16 * WM
layout(constant_id = 2) const uint BN = 64;    // multiple of 16 * WN
layout(constant_id = 3) const uint BK = 32;    // multiple of 16 and of SPAN
layout(constant_id = 4) const uint WM = 2;     // subgroups along rows
layout(constant_id = 5) const uint WN = 2;     // subgroups along tokens

#define W_BINDING 0
#include "common/dequant.glsl"
#if WTYPE == T_F32
#error F32 weights stay on matmul_tiled
#endif

layout(binding = 1) readonly buffer XB { vec4 x4[]; };
layout(binding = 2) readonly buffer BB { float bias[]; };
layout(binding = 3) buffer YB { float y[]; };

layout(push_constant) uniform PC {
    uint rows; uint cols; uint T; uint w_off; uint x_stride; uint y_stride; uint y_off; uint b_off; uint flags;
    uint ksteps; uint part_stride;
} pc;

#if NIBBLE_UNITS
#define W_PAIR 2        // units 2m, 2m+1 interleave 4-element runs: together they fill whole uvec4s
#else
#define W_PAIR 1
#endif
const uint PAIR = W_PAIR;
const uint V8 = PAIR * U4 / 2;                 // uvec4s (8 halves) per weight item of PAIR units
const uint WG = gl_WorkGroupSize.x;
const uint MS = BM / WM, NS = BN / WN;         // rows, tokens per subgroup
const uint MA = MS / 16, NA = NS / 16;         // accumulators per subgroup along rows, tokens (<= 4)
const uint ST = BK / 8 + 1;                    // shared row stride in uvec4s (+16 B against bank conflicts)
const uint ASZ = BM * ST, BSZ = BN * ST;
const uint IPR = BK / (UNIT * PAIR);           // weight items per row per K step
const uint NWI = (BM * IPR + WG - 1) / WG;     // weight items per invocation per K step
const uint NXI = (BN * (BK / 8) + WG - 1) / WG; // x uvec4s per invocation per K step

shared uvec4 As[2 * ASZ];                      // [buf][row][k / 8]
shared uvec4 Bs[2 * BSZ];                      // [buf][token][k / 8]
shared float Cs[WM * WN * 256];                // one 16x16 staging tile per subgroup

uvec4 pw[NWI * V8];                            // the next K step, in registers
uvec4 px[NXI];

uvec4 pack8(vec4 a, vec4 b) {
    return uvec4(packHalf2x16(a.xy), packHalf2x16(a.zw), packHalf2x16(b.xy), packHalf2x16(b.zw));
}

// element (within the row) of uvec4 n of the item starting at unit u
uint item_x(uint u, uint n) { return PAIR == 2u ? unit_x(u, n) : unit_x(u, 2u * n); }

void fetch(uint r0, uint t0, uint k0, uint rbytes) {
    uint lid = gl_LocalInvocationID.x;
    [[unroll]] for (uint i = 0; i < NWI; i++) {
        uint idx = lid + i * WG, r = idx / IPR, u = k0 / UNIT + (idx % IPR) * PAIR, row = r0 + r;
        if (idx < BM * IPR && row < pc.rows && u * UNIT < pc.cols) {
            uint rb = pc.w_off + row * rbytes;
#if WTYPE == T_F16
            pw[i] = w128[(rb >> 4) + u];
#elif W_PAIR == 2
            vec4 a[U4], b[U4];
            load_unit(rb, u, a);
            load_unit(rb, u + 1u, b);
            for (uint n = 0; n < V8; n++) pw[i * V8 + n] = pack8(a[n], b[n]);
#else
            vec4 wv[U4];
            load_unit(rb, u, wv);
            for (uint n = 0; n < V8; n++) pw[i * V8 + n] = pack8(wv[2u * n], wv[2u * n + 1u]);
#endif
        } else {
            for (uint n = 0; n < V8; n++) pw[i * V8 + n] = uvec4(0u);
        }
    }
    [[unroll]] for (uint i = 0; i < NXI; i++) {
        uint idx = lid + i * WG, t = idx / (BK / 8), tok = t0 + t, kk = k0 + 8u * (idx % (BK / 8));
        if (idx < BN * (BK / 8) && tok < pc.T && kk < pc.cols) {
            uint v = (tok * pc.x_stride + kk) >> 2;
            px[i] = pack8(x4[v], x4[v + 1u]);
        } else {
            px[i] = uvec4(0u);
        }
    }
}

void stash(uint buf, uint k0) {
    uint lid = gl_LocalInvocationID.x;
    [[unroll]] for (uint i = 0; i < NWI; i++) {
        uint idx = lid + i * WG, r = idx / IPR, u = k0 / UNIT + (idx % IPR) * PAIR;
        if (idx < BM * IPR)
            for (uint n = 0; n < V8; n++) As[buf * ASZ + r * ST + (item_x(u, n) - k0) / 8u] = pw[i * V8 + n];
    }
    [[unroll]] for (uint i = 0; i < NXI; i++) {
        uint idx = lid + i * WG;
        if (idx < BN * (BK / 8)) Bs[buf * BSZ + (idx / (BK / 8)) * ST + idx % (BK / 8)] = px[i];
    }
}

#define MC fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>
#define MH fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>

// Write one 16x16 accumulator (rows rb.., tokens tb..) through this subgroup's staging tile.
void store_tile(MC c, uint rb, uint tb, uint cbase, bool has_bias, bool accum, uint pbase) {
    coopMatStoreNV(c, Cs, cbase, 16, true);   // (r, t) at t * 16 + r
    subgroupMemoryBarrierShared();
    subgroupBarrier();
    for (uint e = gl_SubgroupInvocationID; e < 256; e += gl_SubgroupSize) {
        uint row = rb + (e & 15u), tok = tb + (e >> 4);
        if (row < pc.rows && tok < pc.T) {
            uint idx = pbase + tok * pc.y_stride + pc.y_off + row;
            float v = Cs[cbase + e];
            if (has_bias) v += bias[pc.b_off + row];
            if (accum) v += y[idx];
            y[idx] = v;
        }
    }
    subgroupBarrier();
}

// Accumulators are plain variables (up to 4 x 4, unused ones are removed at specialization): the
// driver does not keep arrays of cooperative matrices in registers (measured: 10x slower).
#define LOAD_A(i) if (MA > i) coopMatLoadNV(a##i, As, cur * ASZ + (sr * MS + i * 16) * ST + kk * 2, ST, false);
#define MMA(i, j) if (MA > i) c##i##j = coopMatMulAddNV(a##i, b, c##i##j);
#define COLUMN(j) if (NA > j) { \
    coopMatLoadNV(b, Bs, cur * BSZ + (sc * NS + j * 16) * ST + kk * 2, ST, true); \
    MMA(0, j) MMA(1, j) MMA(2, j) MMA(3, j) }
#define STORE(i, j) if (MA > i && NA > j) \
    store_tile(c##i##j, r0 + sr * MS + i * 16, t0 + sc * NS + j * 16, sg * 256, has_bias, accum, pbase);
#define ROW_OF(i, X) X(i, 0) X(i, 1) X(i, 2) X(i, 3)

void main() {
    uint r0 = (gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x) * BM;
    if (r0 >= pc.rows) return;
    uint tiles = (pc.T + BN - 1) / BN, slice = gl_WorkGroupID.y / tiles;
    uint t0 = (gl_WorkGroupID.y % tiles) * BN;
    uint sg = gl_SubgroupID, sr = sg % WM, sc = sg / WM;
    uint rbytes = row_bytes(pc.cols);

    MC c00 = MC(0.0), c01 = MC(0.0), c02 = MC(0.0), c03 = MC(0.0), c10 = MC(0.0), c11 = MC(0.0), c12 = MC(0.0),
       c13 = MC(0.0), c20 = MC(0.0), c21 = MC(0.0), c22 = MC(0.0), c23 = MC(0.0), c30 = MC(0.0), c31 = MC(0.0),
       c32 = MC(0.0), c33 = MC(0.0);

    uint nk = (pc.cols + BK - 1) / BK, s0 = slice * pc.ksteps;
    if (pc.ksteps != 0u) nk = min(nk, s0 + pc.ksteps);
    fetch(r0, t0, s0 * BK, rbytes);
    stash(0, s0 * BK);
    barrier();
    for (uint s = s0; s < nk; s++) {
        uint cur = (s - s0) & 1u;
        if (s + 1 < nk) fetch(r0, t0, (s + 1) * BK, rbytes);
        [[unroll]] for (uint kk = 0; kk < BK / 16; kk++) {
            MH a0, a1, a2, a3, b;   // A = W rows, row-major: (r, k) at r * ST + k / 8
            LOAD_A(0) LOAD_A(1) LOAD_A(2) LOAD_A(3)
            COLUMN(0) COLUMN(1) COLUMN(2) COLUMN(3)   // B = x tile transposed: (k, t) at t * ST + k / 8
        }
        if (s + 1 < nk) stash(cur ^ 1u, (s + 1) * BK);
        barrier();
    }

    bool has_bias = (pc.flags & 1u) != 0u, accum = (pc.flags & 2u) != 0u;
    uint pbase = slice * pc.part_stride;
    ROW_OF(0, STORE) ROW_OF(1, STORE) ROW_OF(2, STORE) ROW_OF(3, STORE)
}
