"""Pipeline parallel on MLX's ring backend over loopback, with real mlx.launch ranks.

Each run starts 2 or 3 processes (tests/distributed_rank.py); rank 0 writes what it saw
through the library and every rank what it holds. Compared with one process's load().
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoints import make_checkpoint, tiny_config

HERE = Path(__file__).parent
MLX_LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))


def free_port_block(n: int) -> int:
    """A port p with p..p+n-1 free right now (the ring listens on consecutive ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_free(base + i) for i in range(1, n)):
            return base
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch(ranks: int, model: Path, out: Path, timeout: float = 90,
           **env: str) -> subprocess.CompletedProcess:  # fmt: skip
    assert MLX_LAUNCH, "mlx.launch is not installed beside this python"
    cmd = [MLX_LAUNCH, "--backend", "ring", "-n", str(ranks), "-p", str(free_port_block(ranks)),
           sys.executable, str(HERE / "distributed_rank.py"), str(model), str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), **env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def single(model: Path) -> dict:
    """What one process computes for the same calls as distributed_rank.run()."""
    import mlx.core as mx

    from qwen3_chat.weights.loader import load_model

    m = load_model(model, dtype="float32")
    ids = mx.array([[1, 5, 9, 42, 7, 300, 11, 2, 64, 3]], dtype=mx.int32)
    cache = m.make_cache()
    prefill = m(ids[:, :7], cache=cache, last_only=True)
    step = m(ids[:, 7:8], cache=cache, last_only=True)
    return {"full": m(ids), "prefill": prefill, "step": step, "params": m.parameters(), "m": m}


def check_logits(out: Path, ref: dict) -> None:
    """Rank 0's logits (a whole sequence, a cached prefill and step) are one process's."""
    got = {k: np.load(f"{out}.{k}.npy") for k in ("full", "prefill", "step", "again")}
    for key in ("full", "prefill", "step"):
        np.testing.assert_allclose(got[key], np.array(ref[key]), atol=1e-5, rtol=0)
    # A rewind travels to the followers: the same step after trimming gives the same logits.
    np.testing.assert_allclose(got["again"], np.array(ref["step"]), atol=1e-5, rtol=0)
    assert got["full"].argmax(-1).tolist() == np.array(ref["full"]).argmax(-1).tolist()


@pytest.mark.parametrize(("moe", "ranks", "tied"), [(False, 2, True), (True, 3, False)])
def test_pipeline_matches_one_process_and_each_rank_holds_its_share(tmp_path, moe, ranks, tied):
    from mlx.utils import tree_flatten

    cfg = tiny_config(moe=moe, num_hidden_layers=3, tie_word_embeddings=tied)
    model = make_checkpoint(tmp_path / "m", cfg)
    out = tmp_path / "out.json"
    run = launch(ranks, model, out)
    assert run.returncode == 0, run.stderr[-2000:]
    ref = single(model)
    check_logits(out, ref)

    # Each rank holds exactly its layers (plus embedding first, norm/lm_head last), and its
    # memory is that share, not the model: the other tensors were never read.
    everything = dict(tree_flatten(ref["params"]))
    held = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]
    layer_of = {r: {int(k.split(".")[2]) for k in h["names"] if k.startswith("model.layers.")}
                for r, h in enumerate(held)}  # fmt: skip
    assert [sorted(layer_of[r]) for r in range(ranks)] == (
        [[0, 1], [2]] if ranks == 2 else [[0], [1], [2]]
    )
    names = [set(h["names"]) for h in held]
    assert set().union(*names) == set(everything)
    # Nothing held twice, but a tied embedding: the first rank embeds, the last projects.
    assert sum(len(n) for n in names) == len(everything) + (1 if tied else 0)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert "model.embed_tokens.weight" in names[0] and head in names[-1]
    total = sum(v.nbytes for v in everything.values())
    for h in held:
        assert h["nbytes"] == sum(everything[k].nbytes for k in h["names"])
        assert h["nbytes"] < total * 0.75
        assert h["active"] < h["nbytes"] + 64 * 1024  # active memory: its share, no more


def test_chat_session_greedy_tokens_match(tmp_path, qwen3_tokenizer_dir):
    """Through ChatSession (prefill, decode, cache reuse across two turns) on 2 ranks."""
    from qwen3_chat.chat.session import ChatSession
    from qwen3_chat.chat.tokenizer import Tokenizer
    from qwen3_chat.engine.events import Finished

    # Untied: a tiny tied model repeats one token, which would prove little.
    cfg = tiny_config(num_hidden_layers=3, vocab_size=151936)
    model = make_checkpoint(tmp_path / "m", cfg, seed=1, tokenizer_dir=qwen3_tokenizer_dir)
    out = tmp_path / "out.json"
    run = launch(2, model, out)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(out.read_text())
    ref = single(model)
    check_logits(out, ref)  # the full vocabulary this time
    m = ref["m"]
    chat = ChatSession(m, Tokenizer.from_dir(model), sampling_overrides={"temperature": 0.0},
                       max_tokens=8, budget=None)  # fmt: skip
    turns = [list([e for e in chat.send(t) if isinstance(e, Finished)][-1].token_ids)
             for t in ("Hello there", "And again?")]  # fmt: skip
    assert got["chat"] == turns
    assert len(set(turns[0])) > 6  # varied tokens, not one repeated


def test_a_rank_without_the_model_fails_before_anyone_loads(tmp_path):
    model = make_checkpoint(tmp_path / "m", tiny_config())
    out = tmp_path / "out.json"
    run = launch(2, model, out, MISSING_ON_RANK="1")
    assert run.returncode == 0, run.stderr[-2000:]
    error = json.loads(out.read_text())["error"]
    assert error.startswith("distributed: 127.0.0.1#1: model ") and "missing" in error
    assert not list(tmp_path.glob("out.json.rank*"))  # no rank got as far as loading


def test_tensor_parallel_matches_one_process_and_splits_every_layer(tmp_path):
    from mlx.utils import tree_flatten

    # Layer 0 has experts, layer 1 a dense MLP: both kinds are split.
    cfg = tiny_config(moe=True, num_hidden_layers=2, mlp_only_layers=[1])
    model = make_checkpoint(tmp_path / "m", cfg)
    out = tmp_path / "out.json"
    run = launch(2, model, out, PARALLEL="tensor")
    assert run.returncode == 0, run.stderr[-2000:]
    ref = single(model)
    check_logits(out, ref)

    full = {k: v.shape for k, v in tree_flatten(ref["params"])}
    for rank in range(2):
        held = json.loads(Path(f"{out}.rank{rank}").read_text())["names"]
        names = {k.replace(".inner.", ".") for k in held}  # the all_sum wrappers
        head = {"lm_head.weight", "model.norm.weight"}
        assert names == (set(full) if rank == 0 else set(full) - head)
    # Every rank holds half the heads and half of each MLP/expert width, so the layers'
    # share is half; embedding, norms and router are whole on each.
    params = dict(tree_flatten(ref["params"]))
    layer_bytes = sum(v.nbytes for k, v in params.items() if ".layers." in k)
    whole = [k for k in params
             if ".layers." in k and ("norm" in k or k.endswith("mlp.gate.weight"))]  # fmt: skip
    norms = sum(params[k].nbytes for k in whole)
    for rank in range(2):
        h = json.loads(Path(f"{out}.rank{rank}").read_text())
        rest = sum(v.nbytes for k, v in params.items()
                   if ".layers." not in k and (rank == 0 or k not in head))  # fmt: skip
        assert h["nbytes"] == rest + norms + (layer_bytes - norms) // 2
        assert h["active"] < h["nbytes"] + 64 * 1024


def test_tensor_parallel_only_where_heads_divide():
    from qwen3_chat.distributed.tensor import choose_parallel
    from qwen3_chat.models import config_from_dict

    # 6 query heads would split 3 ways, the 2 KV heads not (Qwen3-235B: 4 KV heads)
    cfg = config_from_dict(tiny_config(num_attention_heads=6, num_key_value_heads=2))
    assert choose_parallel("tensor", cfg, 2, "ring") == ("tensor", "")
    mode, note = choose_parallel("tensor", cfg, 3, "ring")
    assert mode == "pipeline" and "KV heads (2) do not divide by 3 ranks" in note
    # auto: tensor only over RDMA, where an all_sum per layer is cheap
    assert choose_parallel("auto", cfg, 2, "ring") == ("pipeline", "")
    assert choose_parallel("auto", cfg, 2, "jaccl") == ("tensor", "")
    assert choose_parallel("auto", cfg, 3, "jaccl") == ("pipeline", "")


def test_the_wait_for_a_step_follows_the_measured_pace(monkeypatch):
    from qwen3_chat.distributed.group import Deadline

    monkeypatch.setenv("QWEN3_DIST_TIMEOUT", "5")
    d = Deadline()
    first = d.limit(512)
    assert 5 < first and d.limit(1) < 5.5  # a decode step is given little beyond the base
    d.observe(128, 12.8)  # a slow machine: 0.1 s per token
    assert d.limit(512) == pytest.approx(5 + 3 * 0.1 * 512)
    d.observe(1, 0.01)  # a faster step does not shorten the wait below the slowest pace
    assert d.limit(1) == pytest.approx(5 + 3 * 0.1)
