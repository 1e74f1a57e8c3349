"""Tensor parallel: every rank holds a slice of every layer (attention heads, MLP and expert
columns/rows) and the partial results meet in an all_sum after o_proj and after the MLP.

Rank 0 broadcasts each command and the token ids (an all_sum where the others add zeros),
so every rank embeds and runs the same layers; only rank 0 applies the final norm and
lm_head. Only where the heads and widths divide by the rank count; else pipeline.
The hybrid family's Gated DeltaNet layers split by key-head groups (tensor_hybrid.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen3_chat.distributed.group import HEADER_SIZE, Header, PipelineError
from qwen3_chat.distributed.pipeline import PipelineModel
from qwen3_chat.distributed.stage import Stage, fill_weights
from qwen3_chat.distributed.tensor_hybrid import (
    HYBRID_SPLIT_FIELDS,
    Plan,
    hybrid_dims,
    linear_attn_plan,
)
from qwen3_chat.errors import ModelLoadError
from qwen3_chat.files import read_json
from qwen3_chat.models import AnyConfig, build_model, config_from_dict
from qwen3_chat.models.cache import LayerCache
from qwen3_chat.models.config import ModelConfig
from qwen3_chat.models.hybrid_config import HybridConfig
from qwen3_chat.weights.loader import read_weights

# Modules split by output rows (heads, MLP columns) and by input columns (what follows them).
ROW_SPLIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "gate_proj", "up_proj")
COL_SPLIT = ("self_attn.o_proj", "down_proj")
# The config fields each rank divides by the rank count (its local head counts and widths).
SPLIT_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size",
                "moe_intermediate_size")  # fmt: skip
# Over TCP an all_sum costs a round of the ring, twice per layer: pipeline sends one message
# per rank per token instead. With RDMA (jaccl) the all_sums are cheap and tensor wins.
TENSOR_BACKENDS = ("jaccl",)


def _dense_dims(config: ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    """(the head counts and widths that must divide, the input width of each projection
    split by columns)."""
    dims = {"attention heads": config.num_attention_heads,
            "KV heads": config.num_key_value_heads,
            "MLP width": config.intermediate_size}  # fmt: skip
    if config.is_moe:
        dims["expert width"] = config.moe_intermediate_size
    inputs = {"o_proj": config.num_attention_heads * config.head_dim,  # type: ignore[operator]
              "down_proj": config.moe_intermediate_size if config.is_moe
              else config.intermediate_size}  # fmt: skip
    return dims, inputs


def split_problem(config: AnyConfig, size: int) -> str:
    """Why `config` cannot be split `size` ways by heads and widths ("" when it can)."""
    if config.attention_bias:
        return "attention biases are not split"
    hybrid = isinstance(config, HybridConfig)
    dims, inputs = hybrid_dims(config) if hybrid else _dense_dims(config)  # type: ignore[arg-type]
    if config.quantization:  # input columns of packed weights split only at whole groups
        gs = int(config.quantization.get("group_size", 64))
        dims.update({f"quantization groups of {name}": n // gs for name, n in inputs.items()})
    for what, n in dims.items():
        if n % size:
            return f"{what} ({n}) do not divide by {size} ranks"
    return ""


def choose_parallel(asked: str, config: AnyConfig, size: int, backend: str) -> tuple[str, str]:
    """(pipeline or tensor, a note for the user or "") for --parallel `asked`."""
    if asked == "pipeline":
        return "pipeline", ""
    problem = split_problem(config, size)
    if asked == "tensor":
        if problem:
            return "pipeline", f"tensor parallel is not possible ({problem}); using pipeline"
        return "tensor", ""
    if problem or backend not in TENSOR_BACKENDS:
        return "pipeline", ""
    return "tensor", ""


class AllSum(nn.Module):
    """Adds up a module's partial results from every rank (after loading: the wrapper
    changes parameter names)."""

    def __init__(self, inner: nn.Module, group: Any):
        super().__init__()
        self.inner = inner
        self._group = group

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return mx.distributed.all_sum(self.inner(*args, **kwargs), group=self._group)


def _plan(key: str, shape: tuple[int, ...], config: AnyConfig) -> Plan | None:
    """How tensor `key` is split; None for one every rank holds whole."""
    module, _, param = key.rpartition(".")
    if isinstance(config, HybridConfig) and ".linear_attn." in key:
        return linear_attn_plan(module, param, shape, config)
    if module.endswith(ROW_SPLIT):
        axis = -1 if param == "bias" else -2
    elif module.endswith(COL_SPLIT):
        axis = -1
    else:
        return None
    return axis, (shape[axis],)


def _slice(key: str, value: mx.array, rank: int, size: int, config: AnyConfig) -> mx.array:
    plan = _plan(key, tuple(value.shape), config)
    if plan is None:
        return value
    axis, parts = plan
    rows, start = [], 0
    for part in parts:  # this rank's share of each part, in order
        n = part // size
        rows.append(mx.arange(start + rank * n, start + (rank + 1) * n))
        start += part
    # take copies the slice: a view would keep the whole tensor alive.
    return mx.take(value, mx.concatenate(rows), axis=axis)


def load_tensor_stage(path: str | Path, group: Any, *, bits: int | None = None,
                      dtype: mx.Dtype | None = None) -> Stage:  # fmt: skip
    """This rank's slice of every layer, read lazily; embedding on every rank, the final
    norm and lm_head on rank 0 only."""
    path = Path(path)
    rank, size = group.rank(), group.size()
    config = config_from_dict(read_json(path / "config.json", error=ModelLoadError))
    problem = split_problem(config, size)
    if problem:
        raise PipelineError(f"tensor parallel: {problem}")
    fields = SPLIT_FIELDS + (HYBRID_SPLIT_FIELDS if isinstance(config, HybridConfig) else ())
    local = dataclasses.replace(config, **{f: getattr(config, f) // size for f in fields})
    model = build_model(local)
    weights, _origin = read_weights(path)
    weights = model.sanitize(weights)
    if rank != 0:  # the head runs on rank 0 only
        head = ("lm_head.", "model.norm.")
        weights = {k: v for k, v in weights.items() if not k.startswith(head)}
        model.model.pop("norm")
        if "lm_head" in model:
            model.pop("lm_head")
    weights = {k: _slice(k, v, rank, size, config) for k, v in weights.items()}
    fill_weights(model, config, weights, f"{path}: rank {rank}", bits=bits, dtype=dtype)
    del weights
    for layer in model.model.layers:
        mx.eval(layer.parameters())  # layer by layer keeps peak memory near the final size
        if "linear_attn" in layer:  # a Gated DeltaNet layer of the hybrid family
            layer.linear_attn.out_proj = AllSum(layer.linear_attn.out_proj, group)
        else:
            layer.self_attn.o_proj = AllSum(layer.self_attn.o_proj, group)
        # With a shared expert: sigmoid(gate(x)) is the same on every rank and scales each
        # rank's partial down_proj output, so one all_sum of the block is exact.
        layer.mlp = AllSum(layer.mlp, group)
    mx.eval(model.parameters())
    model.eval()
    n = config.num_hidden_layers
    return Stage(model, range(n), n, head=rank == 0)


def _broadcast(values: mx.array, group: Any) -> mx.array:
    """Rank 0's values on every rank: the others contribute zeros."""
    return mx.distributed.all_sum(values, group=group)


class BroadcastSteps:
    """A tensor-parallel follower's side of each command."""

    def __init__(self, stage: Stage, group: Any):
        self.stage, self.group = stage, group

    def header(self) -> Header:
        raw = _broadcast(mx.zeros((HEADER_SIZE,), dtype=mx.int32), self.group)
        mx.eval(raw)
        return Header.decode(raw.tolist())

    def forward(self, header: Header, cache: list[LayerCache] | None) -> None:
        ids = _broadcast(mx.zeros((1, header.tokens), dtype=mx.int32), self.group)
        out = self.stage(ids, cache, header.last_only)
        mx.eval(out, [c.state for c in cache or []])


class TensorModel(PipelineModel):
    """Rank 0 of a tensor-parallel group: the same interface as PipelineModel."""

    def _header(self, header: Header) -> mx.array:
        return _broadcast(mx.array(header.encode(), dtype=mx.int32), self.group)

    def _forward(self, inputs: mx.array, header: Header,
                 local: list[LayerCache] | None) -> mx.array:  # fmt: skip
        ids = _broadcast(mx.depends(inputs, self._header(header)), self.group)
        return self.stage(ids, local, last_only=header.last_only)
