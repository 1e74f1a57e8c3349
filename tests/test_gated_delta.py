"""The gated delta rule: the chunked prefill and the one-step recurrence against a naive
float64 numpy recurrence written from the rule's definition."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen3_chat.models.gated_delta import gated_delta


def naive(q, k, v, g, beta, state):
    """Token by token, float64. q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g, beta: [B, T, Hv];
    state [B, Hv, Dk, Dv]. Value head h reads key head h // (Hv / Hk)."""
    q, k, v, g, beta, s = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g, beta, state))
    s = s.copy()
    b, t, hk, _ = k.shape
    hv = v.shape[2]
    out = np.zeros(v.shape)
    for bi in range(b):
        for h in range(hv):
            kh = h // (hv // hk)
            for ti in range(t):
                s[bi, h] *= np.exp(g[bi, ti, h])
                kt, qt = k[bi, ti, kh], q[bi, ti, kh]
                delta = beta[bi, ti, h] * (v[bi, ti, h] - s[bi, h].T @ kt)
                s[bi, h] += np.outer(kt, delta)
                out[bi, ti, h] = s[bi, h].T @ qt
    return out, s


def inputs(t: int, *, hk=2, hv=4, dk=8, dv=6, b=1, seed=0, correlated=False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hk, dk))
    k = rng.standard_normal((b, t, hk, dk))
    if correlated:  # nearly identical keys: the case that breaks a careless chunk inverse
        k = k[:, :1] + 0.05 * k
    q /= np.linalg.norm(q, axis=-1, keepdims=True) * np.sqrt(dk)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((b, t, hv, dv))
    g = -rng.uniform(0.0, 0.05 if correlated else 0.7, (b, t, hv))
    beta = rng.uniform(0.9 if correlated else 0.0, 1.0, (b, t, hv))
    state = 0.3 * rng.standard_normal((b, hv, dk, dv))
    return [x.astype(np.float32) for x in (q, k, v, g, beta, state)]


def ours(q, k, v, g, beta, state):
    out, s = gated_delta(*(mx.array(x) for x in (q, k, v, g, beta)), mx.array(state))
    return np.array(out), np.array(s)


@pytest.mark.parametrize("t", [2, 63, 64, 150])
def test_chunked_matches_naive_recurrence(t):
    """Lengths below, at and across the 64-token chunk, with an incoming state."""
    x = inputs(t, seed=t)
    out, state = ours(*x)
    ref_out, ref_state = naive(*x)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=2e-5)
    np.testing.assert_allclose(state, ref_state, rtol=0, atol=2e-5)


def test_chunked_stays_exact_with_correlated_keys():
    x = inputs(128, correlated=True, seed=3)
    out, state = ours(*x)
    ref_out, ref_state = naive(*x)
    scale = np.abs(ref_out).max()
    assert np.abs(out - ref_out).max() / scale < 1e-4
    assert np.abs(state - ref_state).max() / np.abs(ref_state).max() < 1e-4


def test_one_step_recurrence_matches_naive_token_by_token():
    q, k, v, g, beta, state = inputs(5, seed=7)
    s = state
    outs = []
    for i in range(5):
        o, s = ours(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], g[:, i : i + 1],
                    beta[:, i : i + 1], s)  # fmt: skip
        outs.append(o)
    ref_out, ref_state = naive(q, k, v, g, beta, state)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), ref_out, atol=2e-5)
    np.testing.assert_allclose(s, ref_state, atol=2e-5)


def test_no_state_means_zero_state_and_batches_are_independent():
    q, k, v, g, beta, state = inputs(70, b=2, seed=11)
    out, s = gated_delta(*(mx.array(x) for x in (q, k, v, g, beta)), None)
    ref_out, ref_state = naive(q, k, v, g, beta, np.zeros_like(state))
    np.testing.assert_allclose(np.array(out), ref_out, atol=2e-5)
    np.testing.assert_allclose(np.array(s), ref_state, atol=2e-5)
