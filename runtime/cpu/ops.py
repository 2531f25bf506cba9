"""The graph's ops in numpy, float32 throughout: the numeric reference for every backend.

Shapes: activations are [T, features] for the T tokens of one call; the KV cache of a layer
is [rows, n_kv_heads * head_dim] for K and for V, position p at row p % rows (rows = n_ctx for a
full layer; a sliding-window layer may keep a ring of fewer, runtime/kv.py).

Decode calls these with T = 1 several hundred times per token, so each op is written as few
numpy calls as it can be (in place where the buffer is ours): at T = 1 the cost of an op is its
number of numpy calls, not its arithmetic.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, group: int | None = None, offset: float = 0.0) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * (w + offset), over each row or each `group`-wide chunk of a row."""
    if offset:
        w = w + np.float32(offset)
    t, n = x.shape
    g = group or n
    if t == 1 and g == n:  # decode: one dot product, a third of the general path's time
        v = x.reshape(n)
        y = x * (np.float32(1.0) / np.sqrt(np.float32(np.dot(v, v)) / np.float32(n) + np.float32(eps)))
        y *= w.reshape(-1)
        return y
    xs = x.reshape(t, n // g, g)
    ss = np.einsum("tkg,tkg->tk", xs, xs)                                         # [T, n/g] sums of squares
    ss *= np.float32(1.0 / g)
    ss += np.float32(eps)
    np.sqrt(ss, out=ss)
    y = np.divide(xs, ss[..., None])                                              # [T, n/g, g]
    y *= w.reshape(-1)[:g]
    return y.reshape(t, n)


def rope_tables(positions: np.ndarray, rope_dim: int, theta: float, freq_factors: list[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each [T, rope_dim/2], for angle pos * theta^(-2i/rope_dim) / factor_i."""
    i = np.arange(rope_dim // 2, dtype=np.float64)
    inv = theta ** (-2.0 * i / rope_dim)
    if freq_factors:
        inv = inv / np.asarray(freq_factors, dtype=np.float64)
    ang = positions.astype(np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_heads: int, head_dim: int, rope_dim: int, mode: str,
         rot: np.ndarray | None = None) -> np.ndarray:
    """Rotate pairs of each head: adjacent (2i, 2i+1) in mode "norm", halves (i, i+d/2) in "neox".

    `rot`, optional, is cos + i*sin as complex64 [T, rope_dim/2] (see `rope_rotation`): in mode
    "norm" an adjacent pair is one complex number, and the rotation one complex multiply.
    """
    t = x.shape[0]
    h = x.reshape(t, n_heads, head_dim)
    if mode == "norm":
        if rot is None:
            rot = rope_rotation(cos, sin)
        if rope_dim == head_dim:
            hc = np.ascontiguousarray(h).view(np.complex64)                       # [T, heads, hd/2]
            return np.multiply(hc, rot[:, None, :]).view(np.float32).reshape(t, n_heads * head_dim)
        out = h.copy()
        oc = out.view(np.complex64)[:, :, :rope_dim // 2]
        oc *= rot[:, None, :]
        return out.reshape(t, n_heads * head_dim)
    if mode != "neox":
        raise ValueError(f"unknown rope mode {mode!r}")
    half = rope_dim // 2
    c, s = cos[:, None, :], sin[:, None, :]
    a, b = h[..., :half], h[..., half:rope_dim]
    out = np.empty_like(h)
    lo, hi = out[..., :half], out[..., half:rope_dim]
    np.multiply(a, c, out=lo)
    lo -= b * s
    np.multiply(a, s, out=hi)
    hi += b * c
    if rope_dim < head_dim:
        out[..., rope_dim:] = h[..., rope_dim:]
    return out.reshape(t, n_heads * head_dim)


def rope_rotation(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """cos + i*sin as complex64, [T, rope_dim/2]."""
    rot = np.empty(cos.shape, dtype=np.complex64)
    rot.real, rot.imag = cos, sin
    return rot


def live_rows(rows: int, pos0: int, t: int, window: int | None) -> tuple[int, int]:
    """[lo, n): the positions some query of a pass of t tokens at pos0 sees; ValueError unless they fit
    the cache's `rows` at once (a ring too small for the pass: a query's keys would be overwritten)."""
    n = pos0 + t
    lo = max(0, pos0 - window + 1) if window else 0
    if n - lo > rows:
        raise ValueError(f"a pass of {t} tokens at position {pos0} reads {n - lo} KV rows at once; the cache "
                         f"holds {rows} (feed fewer tokens per pass: the session's max_pass_tokens)")
    return lo, n


def kv_store(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int,
             window: int | None = None) -> None:
    """Write the keys and values of positions pos0.. at rows position % rows (in two slices where the
    ring wraps), after checking that the pass's live rows fit (`live_rows`)."""
    rows, t = k_cache.shape[0], k.shape[0]
    live_rows(rows, pos0, t, window)
    a = pos0 % rows
    b = min(rows, a + t)
    k_cache[a:b], v_cache[a:b] = k[:b - a], v[:b - a]
    if b - a < t:   # wrapped: the rest from row 0
        k_cache[:t - (b - a)], v_cache[:t - (b - a)] = k[b - a:], v[b - a:]


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, n_heads: int, n_kv_heads: int,
              head_dim: int, scale: float, softcap: float | None = None, window: int | None = None) -> np.ndarray:
    """Causal grouped-query attention of T queries at positions pos0.. over the cache's positions
    [0, pos0 + T) (position p at row p % rows: a ring keeps only the last rows).

    `softcap` caps the scaled scores at +-softcap with tanh (gemma2); `window` lets each query see only
    itself and the window - 1 positions before it (sliding-window layers).
    """
    t = q.shape[0]
    rows = k_cache.shape[0]
    lo, n = live_rows(rows, pos0, t, window)                                    # positions any query sees
    group = n_heads // n_kv_heads
    qh = np.multiply(q.reshape(t, n_kv_heads, group, head_dim).transpose(1, 2, 0, 3), np.float32(scale))  # [kv, g, T, d]
    a = lo % rows
    if a + n - lo <= rows:   # no wrap: views, no copy (every full layer)
        ks, vs = k_cache[a:a + n - lo], v_cache[a:a + n - lo]
    else:                    # the ring wraps inside [lo, n): gather its rows in position order
        idx = np.arange(lo, n) % rows
        ks, vs = k_cache[idx], v_cache[idx]
    kh = ks.reshape(n - lo, n_kv_heads, head_dim).transpose(1, 2, 0)[:, None]  # [kv, 1, d, n - lo]
    vh = vs.reshape(n - lo, n_kv_heads, head_dim).transpose(1, 0, 2)[:, None]  # [kv, 1, n - lo, d]
    scores = np.matmul(qh, kh)                                                    # [kv, g, T, n - lo]
    if softcap:
        scores *= np.float32(1.0 / softcap)
        np.tanh(scores, out=scores)
        scores *= np.float32(softcap)
    if t > 1:
        key = np.arange(lo, n)[None, :]
        query = (pos0 + np.arange(t))[:, None]
        hidden = key > query                                                      # [T, n - lo] causal mask
        if window:
            hidden |= key <= query - window
        bias = np.zeros((t, n - lo), dtype=np.float32)
        bias[hidden] = -np.inf
        scores += bias
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, vh)                                                   # [kv, g, T, d]
    return out.transpose(2, 0, 1, 3).reshape(t, n_heads * head_dim)


def geglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """gelu(g) * u with gelu's tanh form, as gemma's gelu_pytorch_tanh."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    inner = g * g
    inner *= np.float32(0.044715)
    inner += np.float32(1.0)
    inner *= g
    inner *= c
    np.tanh(inner, out=inner)
    inner += np.float32(1.0)
    inner *= g
    inner *= np.float32(0.5)
    inner *= u
    return inner


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap): bounds x to (-cap, cap), nearly unchanged where |x| << cap."""
    y = np.multiply(x, np.float32(1.0 / cap))
    np.tanh(y, out=y)
    y *= np.float32(cap)
    return y


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u, computed without overflow for very negative g."""
    e = np.negative(g)
    np.clip(e, -80, 80, out=e)
    np.exp(e, out=e)
    e += np.float32(1.0)
    np.divide(g, e, out=e)
    e *= u
    return e


def route(logits: np.ndarray, k: int, router: str, norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """A moe op's choice: for each row of router logits [T, n], the k experts of highest score and their
    weights, both [T, k]. Scores are softmax(logits) or sigmoid(logits); with `norm` the k weights are
    divided by their sum. Ties go to the lower expert index (a stable sort)."""
    if router == "softmax":
        scores = logits - logits.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
    elif router == "sigmoid":
        scores = sigmoid(logits)
    else:
        raise ValueError(f"unknown moe router {router!r}")
    idx = np.argsort(-scores, axis=-1, kind="stable")[:, :k]                     # [T, k]
    weights = np.take_along_axis(scores, idx, axis=-1)                          # [T, k]
    if norm:
        weights /= weights.sum(axis=-1, keepdims=True)
    return idx, weights


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x), without overflow for very negative x."""
    e = np.negative(x)
    np.clip(e, -80, 80, out=e)
    np.exp(e, out=e)
    e += np.float32(1.0)
    return np.reciprocal(e, out=e)
