#version 450
// A mixture of experts' router on the device (runtime/vk/moe.py, the resident path): where the tier holds
// every expert, the choice need not go to the host and back. Per row r of the router's logits (one
// invocation each): softmax or sigmoid scores, the k highest (ties to the lower expert, as the numpy
// backend's stable sort), their weights (divided by their sum with `norm`), then the batched experts'
// table that moe_matvec.comp and moe_rows.comp's sum read (the host writes the same one in the other
// paths): slot j = r * k + i for the row's i-th chosen expert in expert order, per role (gate, up, down)
// the expert's tier block and byte offset (from `places`, rewritten by the host when the tier moves),
// its x and y rows; the slots' rows and weights. Also the chosen experts (read back after the pass, for
// the statistics) and the shared expert's rows and gate weights (sigmoid of logit column n).
layout(local_size_x = 64) in;
layout(binding = 0) readonly buffer LB { float logits[]; };     // (T, stride) f32
layout(binding = 1) readonly buffer PB { uint places[]; };      // from places_off: per expert 3 x (block, offset)
layout(binding = 2) writeonly buffer TB { uint tbl[]; };        // 14 * T * k: moe_matvec / sum_rows's table
layout(binding = 3) writeonly buffer SB { uint shared_route[]; }; // rows (T) then gate weights (T, f32 bits)
layout(binding = 4) writeonly buffer IB { uint ids[]; };        // from ids_off: the chosen experts (T * k)
layout(push_constant) uniform PC {
    uint T; uint n; uint k; uint stride; uint flags; uint ids_off; uint places_off;
} pc;
// flags: 1 sigmoid scores (else softmax), 2 normalise the k weights, 4 a shared expert gate at column n
#define MAXK 16

void main() {
    uint r = gl_GlobalInvocationID.x;
    if (r >= pc.T) return;
    uint base = r * pc.stride;
    bool sig = (pc.flags & 1u) != 0u;
    float mx = logits[base];
    for (uint e = 1; e < pc.n; e++) mx = max(mx, logits[base + e]);
    float sum = 0.0;
    if (!sig) for (uint e = 0; e < pc.n; e++) sum += exp(logits[base + e] - mx);
    uint ch[MAXK];
    float wt[MAXK];
    float wsum = 0.0;
    for (uint i = 0; i < pc.k; i++) {   // the i-th highest logit (scores rank as their logits do)
        uint best = 0xffffffffu;
        float bv = 0.0;
        for (uint e = 0; e < pc.n; e++) {
            bool taken = false;
            for (uint j = 0; j < i; j++) taken = taken || ch[j] == e;
            float v = logits[base + e];
            if (!taken && (best == 0xffffffffu || v > bv)) { best = e; bv = v; }
        }
        ch[i] = best;
        wt[i] = sig ? 1.0 / (1.0 + exp(-clamp(bv, -80.0, 80.0))) : exp(bv - mx) / sum;
        wsum += wt[i];
    }
    for (uint i = 1; i < pc.k; i++) {   // expert order: the order the sum adds a row's slots in
        uint c = ch[i];
        float w = wt[i];
        uint j = i;
        for (; j > 0 && ch[j - 1] > c; j--) { ch[j] = ch[j - 1]; wt[j] = wt[j - 1]; }
        ch[j] = c;
        wt[j] = w;
    }
    uint m = pc.T * pc.k;
    for (uint i = 0; i < pc.k; i++) {
        uint j = r * pc.k + i, e = ch[i], p = pc.places_off + 6u * e;
        float w = (pc.flags & 2u) != 0u ? wt[i] / wsum : wt[i];
        for (uint role = 0; role < 3; role++) {
            uint t = 4u * (role * m + j);
            tbl[t] = places[p + 2u * role];
            tbl[t + 1u] = places[p + 2u * role + 1u];
            tbl[t + 2u] = role < 2u ? r : j;
            tbl[t + 3u] = j;
        }
        tbl[12u * m + j] = r;
        tbl[13u * m + j] = floatBitsToUint(w);
        ids[pc.ids_off + j] = e;
    }
    if ((pc.flags & 4u) != 0u) {
        shared_route[r] = r;
        shared_route[pc.T + r] = floatBitsToUint(1.0 / (1.0 + exp(-clamp(logits[base + pc.n], -80.0, 80.0))));
    }
}
