"""Rewinding a hybrid model's cache: the linear layers' state cannot be trimmed, so it goes
back through snapshots taken at chosen offsets (bounded in count and bytes)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hybrid_checkpoints import make_hybrid

from qwen3_chat.models.cache import KVCache, LinearCache, Snapshots
from qwen3_chat.weights.loader import load_model

pytest.importorskip("torch")

IDS = np.random.default_rng(1).integers(0, 256, 120).tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_hybrid("qwen3_next", tmp_path_factory.mktemp("c") / "ckpt")
    return load_model(path)


def feed(model, cache, ids, step=None):
    """Prefill `ids` in one call (or `step`-sized chunks); returns the last logits."""
    step = step or len(ids)
    for i in range(0, len(ids), step):
        logits = model(mx.array([ids[i : i + step]]), cache=cache)
    return np.array(logits[0, -1])


def fresh(model, ids):
    return feed(model, model.make_cache(), ids)


@pytest.mark.parametrize("at, step", [(50, 32), (45, None), (40, 32)])
def test_requested_snapshot_is_taken_at_a_chunk_end_or_inside_a_chunk(model, at, step):
    cache, snaps = model.make_cache(), Snapshots()
    snaps.request(cache, [at])
    feed(model, cache, IDS[:50], step=step)  # a prefill of 50, in one call or in chunks
    for t in IDS[50:55]:  # decode steps move on
        model(mx.array([[t]]), cache=cache)
    snaps.collect(cache)
    assert [p[0] for p in snaps.points] == [at]
    assert snaps.rewind(cache, at) == at
    assert all(c.offset == at for c in cache)
    got = feed(model, cache, IDS[at:80])
    np.testing.assert_allclose(got, fresh(model, IDS[:80]), rtol=0, atol=1e-5)


def test_rewind_falls_back_to_the_latest_snapshot_before_the_target(model):
    cache, snaps = model.make_cache(), Snapshots()
    feed(model, cache, IDS[:30])
    snaps.add(cache)
    feed(model, cache, IDS[30:60])
    snaps.add(cache)
    feed(model, cache, IDS[60:90])
    # 75 is not reachable (no trim, no snapshot there): 60 is the latest usable point.
    assert snaps.rewind(cache, 75) == 60
    assert [p[0] for p in snaps.points] == [30, 60]
    kv = next(c for c in cache if isinstance(c, KVCache))
    assert kv.offset == 60
    np.testing.assert_allclose(
        feed(model, cache, IDS[60:75]), fresh(model, IDS[:75]), rtol=0, atol=1e-5
    )
    # Below every snapshot: start over from nothing, exactly.
    assert snaps.rewind(cache, 20) == 0 and snaps.points == []
    np.testing.assert_allclose(feed(model, cache, IDS[:20]), fresh(model, IDS[:20]), atol=1e-5)


def test_one_decode_step_is_undone_without_a_snapshot(model):
    cache, snaps = model.make_cache(), Snapshots()
    feed(model, cache, IDS[:40])
    model(mx.array([[IDS[40]]]), cache=cache)
    assert snaps.rewind(cache, 40) == 40  # the speculative step a forced token replaces


def test_snapshots_are_bounded_in_count_and_bytes(model):
    cache = model.make_cache()
    snaps = Snapshots(max_count=2)
    for end in (10, 20, 30):
        feed(model, cache, IDS[end - 10 : end])
        snaps.add(cache)
    assert [p[0] for p in snaps.points] == [20, 30]
    one = snaps.nbytes // 2
    linear = [c for c in cache if isinstance(c, LinearCache)]
    assert one == sum(c.nbytes for c in linear)  # a point costs the linear layers' state
    assert one == model.config.snapshot_bytes(compute_bytes=4)  # the formula in the README
    tight = Snapshots(max_bytes=one)
    tight.add(cache)
    feed(model, cache, IDS[30:40])
    tight.add(cache)
    assert [p[0] for p in tight.points] == [40]
