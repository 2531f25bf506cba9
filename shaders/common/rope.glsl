// Rotary position embedding arithmetic, shared by rope.comp, kv_store_rope.comp and the fused decode
// attention (attention_split.comp FUSE) so that all three rotate a pair alike, bit for bit.

// Angle of rotated pair i (0 <= i < n_rot / 2) at position p: p * freq_scale * base^(-2i / n_rot) / div,
// div = the llama3 frequency factor ff[i], or 1.
float rope_theta(uint i, uint p, uint n_rot, float base, float freq_scale, float div) {
    float inv = exp2(-2.0 * float(i) / float(n_rot) * log2(base)) * freq_scale;
    return float(p) * (inv / div);
}

// The pair (a, b) rotated by theta.
vec2 rope_rotate(float a, float b, float theta) {
    float c = cos(theta), s = sin(theta);
    return vec2(a * c - b * s, a * s + b * c);
}
