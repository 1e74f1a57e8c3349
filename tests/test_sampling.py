"""Sampling policies: greedy, top-k/top-p/min-p sets, penalties, seeds, Qwen's defaults."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen3_chat.engine.sampling import (
    Penalties,
    SamplingParams,
    apply_processors,
    keep_min_p,
    keep_top_k,
    keep_top_p,
    make_logits_processors,
    make_sampler,
)
from qwen3_chat.errors import Qwen3ChatError


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kept(out: mx.array) -> list[set[int]]:
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.array(out)]


def random_logprobs(seed: int, rows: int = 6, vocab: int = 40) -> np.ndarray:
    return log_softmax(np.random.default_rng(seed).standard_normal((rows, vocab)) * 2).astype(
        np.float32
    )


def test_greedy_is_argmax_per_row():
    logits = np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32)
    out = make_sampler(SamplingParams(temperature=0))(mx.array(logits))
    assert out.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("k", [1, 3, 17])
def test_top_k_keeps_the_k_most_likely(k):
    lp = random_logprobs(k)
    expected = [set(np.argsort(-row)[:k].tolist()) for row in lp]
    assert kept(keep_top_k(mx.array(lp), k)) == expected


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    lp = random_logprobs(int(p * 100))
    expected = []
    for row in lp:
        order = np.argsort(-row)
        mass = np.cumsum(np.exp(row[order]))
        n = int(np.searchsorted(mass, p)) + 1  # first prefix whose mass reaches p
        expected.append(set(order[:n].tolist()))
    assert kept(keep_top_p(mx.array(lp), p)) == expected


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_tokens_at_least_min_p_of_the_best(min_p):
    lp = random_logprobs(7)
    probs = np.exp(lp)
    expected = [set(np.flatnonzero(r >= min_p * r.max() * (1 - 1e-6)).tolist()) for r in probs]
    assert kept(keep_min_p(mx.array(lp), min_p)) == expected


def test_filters_off_keep_everything():
    lp = mx.array(random_logprobs(3))
    full = [set(range(40))] * 6
    assert kept(keep_top_k(lp, 0)) == full and kept(keep_top_p(lp, 1.0)) == full
    assert kept(keep_min_p(lp, 0.0)) == full


def test_sampled_frequencies_follow_the_filtered_distribution():
    # 4 tokens; top_k=3 removes the least likely, temperature 0.5 sharpens the rest.
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    n = 4000
    params = SamplingParams(temperature=0.5, top_p=1.0, top_k=3, min_p=0.0, seed=3)
    draws = np.array(make_sampler(params)(mx.array(np.tile(logits, (n, 1)))))
    expected = np.exp(logits[:3] / 0.5)
    expected /= expected.sum()
    freq = np.bincount(draws, minlength=4) / n
    assert freq[3] == 0
    np.testing.assert_allclose(freq[:3], expected, atol=0.03)


def test_sampler_support_is_top_k_then_top_p_over_the_renormalised_top_k():
    # transformers' order: top_k=3 keeps {0, 1, 2} (0.3, 0.25, 0.2 -> 0.4, 0.33, 0.27);
    # top_p=0.7 over that keeps {0, 1} (0.4 + 0.33 >= 0.7), though 0.3 + 0.25 < 0.7.
    probs = np.array([0.3, 0.25, 0.2, 0.15, 0.1], np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.7, top_k=3, min_p=0.0, seed=0)
    draws = np.array(make_sampler(params)(mx.array(np.tile(np.log(probs), (3000, 1)))))
    assert set(draws.tolist()) == {0, 1}
    np.testing.assert_allclose((draws == 0).mean(), 0.3 / 0.55, atol=0.03)
    wide = np.random.default_rng(9).standard_normal((16, 151936)).astype(np.float32)
    out = np.array(make_sampler(params.replace(top_p=1.0, top_k=20))(mx.array(wide)))
    top20 = np.argpartition(-wide, 19, axis=-1)[:, :20]
    assert all(o in row for o, row in zip(out, top20, strict=True))


def test_top_k_one_is_greedy_at_any_temperature():
    logits = mx.array(np.random.default_rng(5).standard_normal((8, 100)).astype(np.float32))
    params = SamplingParams(temperature=1.5, top_p=1.0, top_k=1, seed=0)
    assert make_sampler(params)(logits).tolist() == np.array(logits).argmax(-1).tolist()


def test_presence_penalty_subtracts_once_per_seen_token():
    logits = np.array([[2.0, -2.0, 1.0, 0.5, 3.0]], np.float32)
    seen = mx.array([0, 1, 1, 1, 4], dtype=mx.int32)
    processors = make_logits_processors(SamplingParams(presence_penalty=1.5))
    out = np.array(apply_processors(processors, seen, mx.array(logits)))
    np.testing.assert_allclose(out, [[0.5, -3.5, 1.0, 0.5, 1.5]])


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = np.array([[2.0, -2.0, 1.0, -0.5, 3.0]], np.float32)
    processors = make_logits_processors(SamplingParams(repetition_penalty=1.25))
    out = np.array(apply_processors(processors, [1, 0, 0, 3], mx.array(logits)))
    np.testing.assert_allclose(out, [[1.6, -2.5, 1.0, -0.625, 3.0]], rtol=1e-6)


def test_penalties_compose_and_nothing_seen_changes_nothing():
    logits = np.array([[2.0, -2.0, 1.0]], np.float32)
    params = SamplingParams(presence_penalty=1.0, repetition_penalty=2.0)
    processors = make_logits_processors(params)
    assert len(processors) == 2
    out = np.array(apply_processors(processors, [0, 1], mx.array(logits)))
    np.testing.assert_allclose(out, [[0.5, -6.0, 1.0]])  # (2-1)/2, (-2-1)*2
    same = np.array(apply_processors(processors, [], mx.array(logits)))
    np.testing.assert_array_equal(same, logits)
    assert make_logits_processors(SamplingParams()) == []


def test_running_penalties_equal_the_penalties_over_the_whole_history():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((1, 50)).astype(np.float32) * 3
    params = SamplingParams(presence_penalty=0.7, repetition_penalty=1.3)
    running, history = Penalties(params), []
    for _ in range(3):
        running(mx.array(logits))  # sizes the counts, as the first logits do in generation
        for t in rng.integers(0, 50, 7).tolist():
            running.add(mx.array([t]))
            history.append(t)
        ref = apply_processors(make_logits_processors(params), history, mx.array(logits))
        np.testing.assert_allclose(np.array(running(mx.array(logits))), np.array(ref), rtol=1e-6)
    # A token fed and then taken back (a replaced speculative step) leaves no trace, even
    # when it had been generated before.
    unseen = next(t for t in range(50) if t not in history)
    for t in (history[0], unseen):
        running.add(mx.array([t]))
        running.add(mx.array([t]), -1)
    ref = apply_processors(make_logits_processors(params), history, mx.array(logits))
    np.testing.assert_allclose(np.array(running(mx.array(logits))), np.array(ref), rtol=1e-6)
    fresh = Penalties(params)
    np.testing.assert_array_equal(np.array(fresh(mx.array(logits))), logits)


def test_seeded_sampling_is_reproducible_and_leaves_global_state_alone():
    logits = mx.array(np.random.default_rng(1).standard_normal((1, 1000)).astype(np.float32))
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=7)
    mx.random.seed(123)
    before = mx.random.uniform(shape=(4,)).tolist()
    mx.random.seed(123)
    s1, s2 = make_sampler(params), make_sampler(params)
    run1 = [s1(logits).item() for _ in range(30)]
    assert mx.random.uniform(shape=(4,)).tolist() == before  # global RNG untouched
    run2 = [s2(logits).item() for _ in range(30)]
    other = make_sampler(SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=8))
    run3 = [other(logits).item() for _ in range(30)]
    assert run1 == run2
    assert len(set(run1)) > 5 and run3 != run1  # it really samples, and the seed matters


def test_qwen_recommended_defaults():
    t, n = SamplingParams.for_mode(True), SamplingParams.for_mode(False)
    assert (t.temperature, t.top_p, t.top_k, t.min_p) == (0.6, 0.95, 20, 0.0)
    assert (n.temperature, n.top_p, n.top_k, n.min_p) == (0.7, 0.8, 20, 0.0)
    assert t.replace(temperature=0.2, top_p=None).top_p == 0.95  # None keeps the default


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"presence_penalty": 5.0}, "presence_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),  # before: accepted, then mx.random.key failed mid-answer
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_settings_are_named(bad, word):
    with pytest.raises(Qwen3ChatError, match=word) as e:
        SamplingParams(**bad)
    assert e.value.param == word  # the server's 400 names it from here


def test_a_negative_presence_penalty_favours_seen_tokens():
    """OpenAI's range (-2..2): a negative penalty adds to the logits of tokens already seen,
    in the one-off processors and in generation's running counts alike."""
    from qwen3_chat.engine.defaults import PRESENCE_PENALTY_MIN

    assert PRESENCE_PENALTY_MIN == -2.0
    logits = np.array([[2.0, -2.0, 1.0, 0.5, 3.0]], np.float32)
    params = SamplingParams(presence_penalty=-1.5)
    out = np.array(apply_processors(make_logits_processors(params), [0, 1, 1, 4], mx.array(logits)))
    np.testing.assert_allclose(out, [[3.5, -0.5, 1.0, 0.5, 4.5]])
    running = Penalties(params)
    running(mx.array(logits))
    running.add(mx.array([0, 1, 1, 4]))
    np.testing.assert_allclose(np.array(running(mx.array(logits))), out)
    assert SamplingParams(presence_penalty=PRESENCE_PENALTY_MIN).presence_penalty == -2.0


def test_the_bounds_themselves_are_accepted_and_the_extreme_seed_samples():
    from qwen3_chat.engine.defaults import PRESENCE_PENALTY_MAX, SEED_MAX

    assert SamplingParams(presence_penalty=PRESENCE_PENALTY_MAX).presence_penalty == 2.0
    logits = mx.array(np.random.default_rng(2).standard_normal((1, 100)).astype(np.float32))
    for seed in (0, SEED_MAX):  # both ends reach mx.random.key and sample
        assert 0 <= make_sampler(SamplingParams(temperature=1.0, seed=seed))(logits).item() < 100
