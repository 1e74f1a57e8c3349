"""The gated delta rule (Gated DeltaNet's token mixer) in plain MLX ops.

Per value head, a state S [Dk, Dv] is decayed, corrected towards v along k, then read by q:

    S_t = exp(g_t) * S_{t-1} + k_t (beta_t * (v_t - exp(g_t) * S_{t-1}^T k_t))^T
    o_t = S_t^T q_t

Decode runs that recurrence for one token. Prefill uses the chunked (WY) form, which turns
each chunk of `CHUNK` tokens into a few matrix products, so a long prompt costs
T/CHUNK sequential steps instead of T. Both run on CPU, CUDA and Metal as ordinary ops.
q and k arrive L2-normalised and q already scaled by Dk**-0.5 (the layer does that).
"""

from __future__ import annotations

import mlx.core as mx

CHUNK = 64


def recurrent_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """One token. q, k: [B, H, Dk]; v: [B, H, Dv]; g, beta: [B, H]; state [B, H, Dk, Dv]."""
    state = state * mx.exp(g)[..., None, None]
    kv_mem = (state * k[..., :, None]).sum(axis=-2)  # what the state predicts for k: [B, H, Dv]
    delta = (v - kv_mem) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return (state * q[..., :, None]).sum(axis=-2), state


def _invert_unit_lower(a: mx.array) -> mx.array:
    """(I - a)^-1 for strictly lower-triangular `a` [..., C, C], by forward substitution.

    Not by a Neumann/doubling product: with correlated keys its partial products grow
    like binomial coefficients and cancel catastrophically in float32.
    """
    c = a.shape[-1]
    for i in range(1, c):
        row = a[..., i, :i] + (a[..., i, :i, None] * a[..., :i, :i]).sum(axis=-2)
        a[..., i, :i] = row
    return a + mx.eye(c, dtype=a.dtype)


def chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    chunk: int = CHUNK,
) -> tuple[mx.array, mx.array]:
    """Many tokens. q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; g, beta: [B, H, T]; state
    [B, H, Dk, Dv]. Returns (out [B, H, T, Dv], final state)."""
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    pad = (-t) % chunk
    if pad:
        # Zero keys and beta leave the state untouched; zero log-decay leaves it undecayed.
        q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
        g, beta = (mx.pad(x, [(0, 0), (0, 0), (0, pad)]) for x in (g, beta))
    n = (t + pad) // chunk
    q, k, v = (x.reshape(b, h, n, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(b, h, n, chunk), beta.reshape(b, h, n, chunk)
    k_beta = k * beta[..., None]
    v_beta = v * beta[..., None]
    gc = mx.cumsum(g, axis=-1)  # log of the decay from the chunk's start to each position
    causal = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    # decay[i, j] = exp(gc_i - gc_j) for j <= i; masked before exp so nothing overflows.
    diff = gc[..., :, None] - gc[..., None, :]
    decay = mx.exp(mx.where(causal, diff, -mx.inf))
    strict = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_), k=-1)
    a = mx.where(strict, -(k_beta @ k.swapaxes(-1, -2)) * decay, 0)
    w = _invert_unit_lower(a)
    u = w @ v_beta  # the chunk's value corrections, before the incoming state is accounted
    k_cum = w @ (k_beta * mx.exp(gc)[..., None])
    qk = mx.where(causal, (q @ k.swapaxes(-1, -2)) * decay, 0)
    q_decayed = q * mx.exp(gc)[..., None]
    k_to_end = k * mx.exp(gc[..., -1:] - gc)[..., None]
    end_decay = mx.exp(gc[..., -1])[..., None, None]
    outs = []
    for i in range(n):
        v_new = u[:, :, i] - k_cum[:, :, i] @ state
        outs.append(q_decayed[:, :, i] @ state + qk[:, :, i] @ v_new)
        state = state * end_decay[:, :, i] + k_to_end[:, :, i].swapaxes(-1, -2) @ v_new
    out = mx.concatenate(outs, axis=2) if n > 1 else outs[0]
    return out[:, :, :t].reshape(b, h, t, dv), state


def gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None,
) -> tuple[mx.array, mx.array]:
    """The layer's entry point, in its token-major layout (computed in float32).

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g (log-decay, <= 0), beta: [B, T, Hv];
    state: [B, Hv, Dk, Dv] or None. Each key head serves Hv/Hk consecutive value heads.
    Returns (out [B, T, Hv, Dv] in v's dtype, state float32).
    """
    b, t, hk, dk = k.shape
    hv, dv = v.shape[2], v.shape[3]
    if hv != hk:
        q, k = mx.repeat(q, hv // hk, axis=2), mx.repeat(k, hv // hk, axis=2)
    if state is None:
        state = mx.zeros((b, hv, dk, dv), dtype=mx.float32)
    f32 = mx.float32
    if t == 1:
        out, state = recurrent_step(
            q[:, 0].astype(f32),
            k[:, 0].astype(f32),
            v[:, 0].astype(f32),
            g[:, 0].astype(f32),
            beta[:, 0].astype(f32),
            state,
        )
        return out[:, None].astype(v.dtype), state
    out, state = chunked(*(x.swapaxes(1, 2).astype(f32) for x in (q, k, v, g, beta)), state=state)
    return out.swapaxes(1, 2).astype(v.dtype), state
