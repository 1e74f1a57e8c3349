"""One rank's share of a model: its layers' tensors only, read lazily from the folder.

Every host has the whole model folder; each rank maps the safetensors files lazily and
keeps (and so ever reads) only the tensors of its own layers, plus the embedding on the
first rank and the final norm and lm_head on the last (the embedding too when tied).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen3_chat.distributed.group import split_layers
from qwen3_chat.errors import ModelLoadError
from qwen3_chat.files import read_json
from qwen3_chat.models import build_model, config_from_dict
from qwen3_chat.models.cache import LayerCache
from qwen3_chat.weights.loader import default_dtype, in_compute_dtype, read_weights
from qwen3_chat.weights.quantize import apply_quantization_config, quantize_model

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class Stage:
    """Layers `layers` of the model (global indices), and the ends when this rank has them."""

    def __init__(self, model: nn.Module, layers: range, n_layers: int, head: bool = True):
        self.model, self.layers, self.n_layers = model, layers, n_layers
        self.config = model.config
        self.first, self.last = layers.start == 0, layers.stop == n_layers
        self.head = head  # whether the last rank turns activations into logits

    def make_cache(self) -> list[LayerCache]:
        """A KV cache per attention layer, a linear-state cache per Gated DeltaNet layer."""
        return [self.model.model.layers[i].make_cache() for i in self.layers]

    def __call__(self, x: mx.array, cache: list[LayerCache] | None, last_only: bool) -> mx.array:
        """Token ids (first rank) or activations in; activations or logits (last rank) out."""
        inner = self.model.model
        h = inner.embed_tokens(x) if self.first else x
        caches = cache if cache is not None else [None] * len(self.layers)
        for i, c in zip(self.layers, caches, strict=True):
            h = inner.layers[i](h, c, last_only=last_only and i == self.n_layers - 1)
        if not (self.last and self.head):
            return h
        return self.model.head(h)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def parameter_names(self) -> list[str]:
        return [k for k, _ in tree_flatten(self.model.parameters())]


def _owned(key: str, layers: range, first: bool, last: bool, tied: bool) -> bool:
    m = _LAYER.match(key)
    if m is not None:
        return int(m.group(1)) in layers
    if key.startswith("model.embed_tokens."):
        return first or (last and tied)
    if key.startswith(("model.norm.", "lm_head.")):
        return last
    return False  # anything else (e.g. a multi-token-prediction head) no rank needs


def fill_weights(model: nn.Module, config: Any, weights: dict[str, mx.array], where: str, *,
                 bits: int | None, dtype: mx.Dtype | None) -> None:  # fmt: skip
    """Load this rank's (already pruned or sliced) tensors into `model`, in the compute dtype,
    then quantize on load if asked; a mismatch is one ModelLoadError naming the rank."""
    if config.quantization:
        apply_quantization_config(model, config.quantization, weights)
    try:
        model.load_weights(in_compute_dtype(model, weights, dtype or default_dtype()),
                           strict=True)  # fmt: skip
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    if bits is not None:
        quantize_model(model, bits)


def load_stage(
    path: str | Path, rank: int, size: int, *, bits: int | None = None,
    dtype: mx.Dtype | None = None,
) -> Stage:  # fmt: skip
    """Build rank `rank` of `size`'s stage from a local Hugging Face-layout folder."""
    path = Path(path)
    config = config_from_dict(read_json(path / "config.json", error=ModelLoadError))
    n = config.num_hidden_layers
    layers = split_layers(n, size)[rank]
    first, last = layers.start == 0, layers.stop == n
    weights, _origin = read_weights(path)  # lazily mapped: nothing is read yet
    tied = bool(config.tie_word_embeddings)
    model = build_model(config)
    # Sanitize first (it renames, e.g. a Qwen3.5 folder's language_model.* keys, lazily),
    # then keep only this rank's tensors: the others are never read.
    weights = model.sanitize(weights)
    weights = {k: v for k, v in weights.items() if _owned(k, layers, first, last, tied)}
    if hasattr(model, "mtp_weights"):
        model.mtp_weights.clear()  # the MTP head drafts on one machine only
    # Prune what other ranks hold, so it is never allocated, read or quantized here.
    inner = model.model
    for i in range(n):
        if i not in layers:
            inner.layers[i] = None
    if not (first or (last and tied)):
        inner.pop("embed_tokens")
    if not last:
        inner.pop("norm")
        if "lm_head" in model:
            model.pop("lm_head")
    fill_weights(model, config, weights, f"{path}: rank {rank}", bits=bits, dtype=dtype)
    del weights
    for i in layers:  # layer by layer keeps peak memory near the final size
        mx.eval(inner.layers[i].parameters())
    mx.eval(model.parameters())
    model.eval()
    return Stage(model, layers, n)
