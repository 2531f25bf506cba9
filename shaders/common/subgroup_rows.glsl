// The frame of the decode kernels whose subgroups each own NR rows of a workgroup's RPW (matvec.comp,
// matvec_k.comp): x, bias and y bindings, the push constants, the rows' store and main(), which gives
// each subgroup its rows in turn. The including shader declares `local_size_x_id = 0`, NR and RPW, and
// defines rows_at(r0, t) after this include: the products of rows r0 .. r0+NR-1 for token t, each
// reduced with subgroupAdd and handed to store_row by the subgroup's first lane.
layout(binding = 1) readonly buffer XB { vec4 x4[]; };
layout(binding = 2) readonly buffer BB { float bias[]; };
layout(binding = 3) buffer YB { float y[]; };

layout(push_constant) uniform PC {
    uint rows;
    uint cols;
    uint T;
    uint w_off;     // byte offset of row 0 in binding 0
    uint x_stride;
    uint y_stride;
    uint y_off;
    uint b_off;
    uint flags;     // 1: add bias, 2: accumulate into y
} pc;

void rows_at(uint r0, uint t);

// y[t, y_off + row] (+)= s (+ bias[b_off + row]), for rows that exist
void store_row(uint t, uint row, float s) {
    if (row >= pc.rows) return;
    uint idx = t * pc.y_stride + pc.y_off + row;
    if ((pc.flags & 1u) != 0u) s += bias[pc.b_off + row];
    if ((pc.flags & 2u) != 0u) s += y[idx];
    y[idx] = s;
}

void main() {
    uint wg = gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x;
    for (uint base = gl_SubgroupID * NR; base < RPW; base += gl_NumSubgroups * NR) {
        uint r0 = wg * RPW + base;
        if (r0 >= pc.rows) return;              // uniform for the subgroup; nothing waits on others
        rows_at(r0, gl_WorkGroupID.y);
    }
}
