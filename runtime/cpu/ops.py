"""The graph's ops in numpy, float32 throughout: the numeric reference for every backend.

Shapes: activations are [T, features] for the T tokens of one call; the KV cache of a layer
is [n_ctx, n_kv_heads * head_dim] for K and for V.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, group: int | None = None) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w, over each row or each `group`-wide chunk of a row."""
    t, n = x.shape
    g = group or n
    xs = x.reshape(t, n // g, g)
    ms = np.mean(np.square(xs), axis=-1, keepdims=True, dtype=np.float32)
    y = xs / np.sqrt(ms + np.float32(eps))
    return (y * w.reshape(-1)[:g] if g != n else y.reshape(t, n) * w).reshape(t, n).astype(np.float32, copy=False)


def rope_tables(positions: np.ndarray, rope_dim: int, theta: float, freq_factors: list[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each [T, rope_dim/2], for angle pos * theta^(-2i/rope_dim) / factor_i."""
    i = np.arange(rope_dim // 2, dtype=np.float64)
    inv = theta ** (-2.0 * i / rope_dim)
    if freq_factors:
        inv = inv / np.asarray(freq_factors, dtype=np.float64)
    ang = positions.astype(np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_heads: int, head_dim: int, rope_dim: int, mode: str) -> np.ndarray:
    """Rotate pairs of each head: adjacent (2i, 2i+1) in mode "norm", halves (i, i+d/2) in "neox"."""
    t = x.shape[0]
    h = x.reshape(t, n_heads, head_dim).copy()
    r = h[:, :, :rope_dim]
    c, s = cos[:, None, :], sin[:, None, :]
    if mode == "norm":
        a, b = r[..., 0::2].copy(), r[..., 1::2].copy()
        r[..., 0::2] = a * c - b * s
        r[..., 1::2] = a * s + b * c
    elif mode == "neox":
        half = rope_dim // 2
        a, b = r[..., :half].copy(), r[..., half:].copy()
        r[..., :half] = a * c - b * s
        r[..., half:] = a * s + b * c
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    return h.reshape(t, n_heads * head_dim)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, n_heads: int, n_kv_heads: int,
              head_dim: int, scale: float) -> np.ndarray:
    """Causal grouped-query attention of T queries at positions pos0.. over cache rows [0, pos0 + T)."""
    t = q.shape[0]
    n = pos0 + t
    group = n_heads // n_kv_heads
    qh = q.reshape(t, n_kv_heads, group, head_dim).transpose(1, 2, 0, 3)          # [kv, g, T, d]
    kh = k_cache[:n].reshape(n, n_kv_heads, head_dim).transpose(1, 2, 0)          # [kv, d, n]
    vh = v_cache[:n].reshape(n, n_kv_heads, head_dim).transpose(1, 0, 2)          # [kv, n, d]
    scores = np.matmul(qh, kh[:, None]) * np.float32(scale)                       # [kv, g, T, n]
    if t > 1:
        mask = np.arange(n)[None, :] > (pos0 + np.arange(t))[:, None]             # [T, n]
        scores[..., mask] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, vh[:, None])                                          # [kv, g, T, d]
    return out.transpose(2, 0, 1, 3).reshape(t, n_heads * head_dim).astype(np.float32, copy=False)


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u, computed without overflow for very negative g."""
    return (g / (1.0 + np.exp(-np.clip(g, -80, 80)))) * u
