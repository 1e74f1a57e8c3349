"""The hybrid Qwen3 family (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) against transformers, from
tiny random checkpoints transformers builds and saves here in the released layouts."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hybrid_checkpoints import ARCHS, fuse_experts, hf_logits, make_hybrid
from safetensors.numpy import load_file, save_file

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.models.cache import LinearCache
from qwen3_chat.models.qwen3_next import VISION_NOTE
from qwen3_chat.weights.loader import load_model

pytest.importorskip("torch")

IDS = np.random.default_rng(0).integers(0, 256, 150).tolist()  # crosses two chunk edges


@pytest.fixture(scope="module", params=ARCHS)
def hybrid(request, tmp_path_factory):
    """(arch, folder, transformers model, our model)."""
    arch = request.param
    path, hf = make_hybrid(arch, tmp_path_factory.mktemp(arch) / "ckpt")
    return arch, path, hf, load_model(path)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_logits_match_transformers(hybrid):
    arch, _, hf, model = hybrid
    ours = np.array(model(mx.array([IDS]))[0])
    assert rel_err(ours, hf_logits(hf, IDS)) < 1e-4, arch


def test_full_forward_equals_chunked_prefill_equals_decode(hybrid):
    _, _, _, model = hybrid
    ids = IDS[:90]
    full = np.array(model(mx.array([ids]))[0])
    cache = model.make_cache()
    assert any(isinstance(c, LinearCache) for c in cache)
    parts = [model(mx.array([ids[a:b]]), cache=cache) for a, b in ((0, 70), (70, 83))]
    steps = [model(mx.array([[t]]), cache=cache) for t in ids[83:]]
    pieces = np.concatenate([np.array(p[0]) for p in parts + steps])
    assert rel_err(pieces, full) < 1e-5
    assert all(c.offset == len(ids) for c in cache)


@pytest.mark.parametrize("layers", [4, 3])  # the last layer: gated attention, Gated DeltaNet
def test_last_only_prefill_is_the_full_forward_s_last_row_and_fills_the_cache(tmp_path, layers):
    """A prefill's final layer runs its output and MLP for the last position only; every
    token must still reach its cache, so the next step sees what a full forward left."""
    path, _ = make_hybrid("qwen3_next", tmp_path / "m", num_hidden_layers=layers)
    model = load_model(path)
    ids = IDS[:70]
    full_cache, last_cache = model.make_cache(), model.make_cache()
    full = model(mx.array([ids]), cache=full_cache)
    last = model(mx.array([ids]), cache=last_cache, last_only=True)
    assert last.shape[1] == 1
    assert rel_err(np.array(last[0, -1]), np.array(full[0, -1])) < 1e-6
    nxt = [model(mx.array([[7]]), cache=c) for c in (full_cache, last_cache)]
    assert rel_err(np.array(nxt[1]), np.array(nxt[0])) < 1e-6


def test_greedy_decode_through_cache_matches_transformers_without_cache(hybrid):
    _, _, hf, model = hybrid
    ids = IDS[:20]
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache, last_only=True)
    ours = []
    for _ in range(5):
        ours.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[ours[-1]]]), cache=cache)
    theirs, seq = [], list(ids)
    for _ in range(5):
        theirs.append(int(hf_logits(hf, seq)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


def test_vision_tower_skipped_with_one_note(hybrid):
    arch, _, _, model = hybrid
    assert model.load_notes == ([] if arch == "qwen3_next" else [VISION_NOTE])


def test_snapshot_restore_gives_identical_continuation(hybrid):
    _, _, _, model = hybrid
    cache = model.make_cache()
    model(mx.array([IDS[:40]]), cache=cache)
    snaps = [c.snapshot() if isinstance(c, LinearCache) else c.offset for c in cache]
    first = np.array(model(mx.array([IDS[40:60]]), cache=cache))
    model(mx.array([IDS[60:70]]), cache=cache)  # wander off, then come back
    for c, s in zip(cache, snaps, strict=True):
        if isinstance(c, LinearCache):
            c.restore(s)
        else:
            c.trim(c.offset - s)
    again = np.array(model(mx.array([IDS[40:60]]), cache=cache))
    np.testing.assert_array_equal(again, first)


def test_linear_cache_undoes_only_its_last_update(hybrid):
    """A speculative decode step can be undone exactly; an arbitrary rewind is refused."""
    _, _, _, model = hybrid
    cache = model.make_cache()
    model(mx.array([IDS[:30]]), cache=cache)
    linear = next(c for c in cache if isinstance(c, LinearCache))
    before = [np.array(a) for a in linear.state]
    model(mx.array([[IDS[30]]]), cache=cache)
    assert not linear.can_trim(2) and linear.trim(2) == 0 and linear.offset == 31
    assert linear.trim(1) == 1 and linear.offset == 30
    for a, b in zip(linear.state, before, strict=True):
        np.testing.assert_array_equal(np.array(a), b)
    assert linear.trim(1) == 0  # only one step is remembered


def test_mtp_tensors_are_kept(tmp_path):
    path, _ = make_hybrid("qwen3_next", tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["mtp.fc.weight"] = np.ones((64, 128), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    model = load_model(path)
    assert list(model.mtp_weights) == ["mtp.fc.weight"]
    assert model.mtp_weights["mtp.fc.weight"].shape == (64, 128)


def test_qwen3_next_with_fused_experts_gives_the_same_logits(tmp_path):
    path, hf = make_hybrid("qwen3_next", tmp_path / "ckpt")
    f = path / "model.safetensors"
    t = fuse_experts(load_file(str(f)), num_experts=4)
    save_file(t, str(f))
    ours = np.array(load_model(path)(mx.array([IDS[:40]]))[0])
    assert rel_err(ours, hf_logits(hf, IDS[:40])) < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("linear_num_value_heads"), "missing linear_num_value_heads"),
        (lambda c: c.update(layer_types=["full_attention"]), "layer_types must list 4"),
        (lambda c: c.update(linear_num_key_heads=3), "linear_num_key_heads (3) must divide"),
        (lambda c: c.update(model_type="qwen4_next"), "unsupported model_type 'qwen4_next'"),
    ],
)
def test_bad_hybrid_configs_give_one_clear_error(tmp_path, change, message):
    path, _ = make_hybrid("qwen3_next", tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_downloaded_hybrid_folder_passes_verification(hybrid, tmp_path):
    from qwen3_chat.errors import DownloadError
    from qwen3_chat.weights.verify import verify_model_dir

    _, path, _, _ = hybrid
    verify_model_dir(path)  # a hybrid folder is not "model_type ... is not qwen3"
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        (broken / f.name).symlink_to(f)
    cfg = json.loads((path / "config.json").read_text())
    (cfg.get("text_config") or cfg).pop("linear_key_head_dim")
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DownloadError, match="missing linear_key_head_dim"):
        verify_model_dir(broken)
