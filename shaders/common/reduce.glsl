// Workgroup reductions. The including shader declares `layout(local_size_x_id = 0) in;`.
// Every invocation of the workgroup must call these (they contain barriers) and gets the result.
// Default: subgroup ops (subgroupAdd/Max) + one shared slot per subgroup; -DNO_SUBGROUP selects a
// shared-memory tree for devices without subgroup arithmetic (workgroup size must be a power of 2).
#ifndef NO_SUBGROUP
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif

shared float red_f[gl_WorkGroupSize.x];   // one slot per subgroup (or per invocation without subgroups)
shared uint red_u[gl_WorkGroupSize.x];

#ifndef NO_SUBGROUP
float wg_sum(float v) {
    v = subgroupAdd(v);
    if (gl_NumSubgroups == 1) return v;
    barrier();                                   // earlier readers of red_f are done
    if (subgroupElect()) red_f[gl_SubgroupID] = v;
    barrier();
    float s = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++) s += red_f[i];
    return s;
}

float wg_max(float v) {
    v = subgroupMax(v);
    if (gl_NumSubgroups == 1) return v;
    barrier();
    if (subgroupElect()) red_f[gl_SubgroupID] = v;
    barrier();
    float s = red_f[0];
    for (uint i = 1; i < gl_NumSubgroups; i++) s = max(s, red_f[i]);
    return s;
}

// (value, index) with the largest value; ties go to the smallest index (numpy argmax order).
uint wg_argmax(float v, uint idx) {
    float m = wg_max(v);
    uint cand = (v == m) ? idx : 0xFFFFFFFFu;
    cand = subgroupMin(cand);
    if (gl_NumSubgroups == 1) return cand;
    barrier();
    if (subgroupElect()) red_u[gl_SubgroupID] = cand;
    barrier();
    uint s = red_u[0];
    for (uint i = 1; i < gl_NumSubgroups; i++) s = min(s, red_u[i]);
    return s;
}
#else
float wg_sum(float v) {
    uint lid = gl_LocalInvocationID.x;
    barrier();
    red_f[lid] = v;
    barrier();
    for (uint s = gl_WorkGroupSize.x / 2; s > 0; s >>= 1) {
        if (lid < s) red_f[lid] += red_f[lid + s];
        barrier();
    }
    return red_f[0];
}

float wg_max(float v) {
    uint lid = gl_LocalInvocationID.x;
    barrier();
    red_f[lid] = v;
    barrier();
    for (uint s = gl_WorkGroupSize.x / 2; s > 0; s >>= 1) {
        if (lid < s) red_f[lid] = max(red_f[lid], red_f[lid + s]);
        barrier();
    }
    return red_f[0];
}

uint wg_argmax(float v, uint idx) {
    uint lid = gl_LocalInvocationID.x;
    float m = wg_max(v);
    red_u[lid] = (v == m) ? idx : 0xFFFFFFFFu;
    barrier();
    for (uint s = gl_WorkGroupSize.x / 2; s > 0; s >>= 1) {
        if (lid < s) red_u[lid] = min(red_u[lid], red_u[lid + s]);
        barrier();
    }
    uint r = red_u[0];
    barrier();
    return r;
}
#endif

// Flattened workgroup index for grids split over x and z (x is capped at 65535 on many GPUs).
uint group_index() {
    return gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x;
}
