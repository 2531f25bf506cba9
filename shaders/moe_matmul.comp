#version 450
// A mixture of experts' prefill products, every chosen expert in ONE dispatch (runtime/vk/moe.py, grouped path):
//   y[j, r] = sum_c x[xrow(j), c] * W_g[r, c]   for the slots j of each group g (grid y) and rows r < rows.
// A group is up to BN slots (rows of the pass that chose one expert, consecutive in slot order) and its
// expert's weight, wherever the device tier placed it (binding 0 is the array of the tier's blocks), read
// from a table the host writes each pass: a layer is one recording however the router spread the rows
// (decode's few slots go through moe_matvec.comp instead). The tile loop is matmul_tiled.comp's: a BM-row x
// BN-slot tile per workgroup, each weight element dequantized once into shared memory for the group's slots.
// Table (uints from tbl_off): per group blk, w_off, j0 (its first slot), n (its slots; 0: an unused group);
// xrow(j) = tbl[rows_off + j] when rows_off != 0xffffffff (the op's input rows, gathered), else j.
// Grid: x*z = ceil(rows / BM), y = groups.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_shader_16bit_storage : require
#include "common/types.glsl"

layout(local_size_x_id = 0) in;                // WG = (BM / TM) * (BN / TN)
layout(constant_id = 1) const uint BM = 64;
layout(constant_id = 2) const uint BN = 32;
layout(constant_id = 3) const uint BK = 32;    // multiple of SPAN
layout(constant_id = 4) const uint TM = 4;
layout(constant_id = 5) const uint TN = 2;
const uint TMN = TM * TN;

#define MAX_BLOCKS 16
layout(binding = 0) readonly buffer WA16 { uint16_t d[]; } wa16[MAX_BLOCKS];
layout(binding = 0) readonly buffer WA32 { uint d[]; } wa32[MAX_BLOCKS];
layout(binding = 0) readonly buffer WA128 { uvec4 d[]; } wa128[MAX_BLOCKS];
uint wblk;   // the group's tier block: the same for the whole workgroup (dynamically uniform)
#define W_ARRAY 1
#define w16 wa16[wblk].d
#define w32 wa32[wblk].d
#define w128 wa128[wblk].d
#include "common/dequant.glsl"

layout(binding = 1) readonly buffer XB { vec4 x4[]; };
layout(binding = 2) readonly buffer TB { uint tbl[]; };
layout(binding = 3) buffer YB { float y[]; };

layout(push_constant) uniform PC {
    uint rows;       // rows of every group's weight
    uint cols;       // elements per row (multiple of UNIT)
    uint x_stride;   // floats between x rows
    uint y_stride;   // floats between y rows (slots)
    uint tbl_off;    // uint index of group 0's entry
    uint rows_off;   // uint index of slot 0's x row, or 0xffffffff: slot j reads x row j
} pc;

const uint WS = BK * BM, XS = BK * BN;
shared float Ws[WS];   // [k][r]
shared float Xs[XS];   // [k][slot]
shared uint xrow[BN];

void main() {
    uint g = pc.tbl_off + 4u * gl_WorkGroupID.y;
    uint n = tbl[g + 3u];
    uint r0 = (gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x) * BM;
    if (n == 0u || r0 >= pc.rows) return;       // uniform for the workgroup
    wblk = tbl[g];
    uint woff = tbl[g + 1u], j0 = tbl[g + 2u];
    uint lid = gl_LocalInvocationID.x;
    const uint WG = gl_WorkGroupSize.x, RX = BM / TM, TY = BN / TN;
    uint tx = lid % RX, ty = lid / RX;
    uint rbytes = row_bytes(pc.cols);
    const uint UPK = BK / UNIT;                 // units per row per K step
    for (uint t = lid; t < BN; t += WG)
        xrow[t] = t < n ? (pc.rows_off == 0xffffffffu ? j0 + t : tbl[pc.rows_off + j0 + t]) : 0u;
    barrier();

    float acc[TMN];
    for (uint i = 0; i < TMN; i++) acc[i] = 0.0;

    for (uint k0 = 0; k0 < pc.cols; k0 += BK) {
        for (uint i = lid; i < BM * UPK; i += WG) {
            uint r = i / UPK, uu = i % UPK;
            uint row = r0 + r, kk = k0 + uu * UNIT;
            vec4 wv[U4];
            if (row < pc.rows && kk < pc.cols) {
                load_unit(woff + row * rbytes, kk / UNIT, wv);
            } else {
                for (uint e = 0; e < U4; e++) wv[e] = vec4(0.0);
            }
            for (uint e = 0; e < U4; e++) {
                uint kb = (unit_x(k0 / UNIT + uu, e) - k0) * BM + r;
                Ws[kb] = wv[e].x; Ws[kb + BM] = wv[e].y; Ws[kb + 2 * BM] = wv[e].z; Ws[kb + 3 * BM] = wv[e].w;
            }
        }
        for (uint i = lid; i < BN * (BK / 4); i += WG) {
            uint t = i / (BK / 4), k4 = i % (BK / 4);
            uint kk = k0 + 4 * k4;
            vec4 v = (t < n && kk < pc.cols) ? x4[(xrow[t] * pc.x_stride + kk) >> 2] : vec4(0.0);
            uint xb = 4 * k4 * BN + t;
            Xs[xb] = v.x; Xs[xb + BN] = v.y; Xs[xb + 2 * BN] = v.z; Xs[xb + 3 * BN] = v.w;
        }
        barrier();
        for (uint k = 0; k < BK; k++) {
            float a[TM], b[TN];
            for (uint i = 0; i < TM; i++) a[i] = Ws[k * BM + tx + i * RX];
            for (uint j = 0; j < TN; j++) b[j] = Xs[k * BN + ty + j * TY];
            for (uint i = 0; i < TM; i++)
                for (uint j = 0; j < TN; j++) acc[i * TN + j] += a[i] * b[j];
        }
        barrier();
    }

    for (uint i = 0; i < TM; i++) {
        uint row = r0 + tx + i * RX;
        if (row >= pc.rows) continue;
        for (uint j = 0; j < TN; j++) {
            uint t = ty + j * TY;
            if (t < n) y[(j0 + t) * pc.y_stride + row] = acc[i * TN + j];
        }
    }
}
