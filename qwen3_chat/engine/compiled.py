"""A compiled one-token decode step for dense and MoE Qwen3 (issue 10, item 1).

Decode is host-bound: building a step's ~800 small ops costs as long as running them.
`mx.compile` fuses each layer's fixed-shape work into one traced graph, so Python and MLX
build far less per token. The attention over the cache grows by one position a step, so
it stays eager between two compiled halves: for layer i, "after attention of i, up to
the queries of i+1" is one compiled function (weights are closed over, so each layer has
its own trace, made once). The position goes in as an array, so no step re-traces.
Prefill and forced multi-token runs use the model's own eager forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import mlx.core as mx

from qwen3_chat.models.cache import KVCache

Decoder = Callable[[object, "Sequence[int] | mx.array", list], mx.array]


class _Layer(Protocol):  # what a compiled step needs of a decoder layer
    input_layernorm: Callable
    self_attn: object

    def feed_forward(self, h: mx.array) -> mx.array: ...


def eager_decode(model, tokens: Sequence[int] | mx.array, cache: list) -> mx.array:
    """Feed one token (or a forced run of tokens); returns the next-token logits [1, V]."""
    x = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens), dtype=mx.int32)
    return model(x.reshape(1, -1), cache=cache, last_only=True)[:, -1, :]


def supports_compiled(model) -> bool:
    """Only the plain Qwen3 stack (dense or MoE) with KV caches has the split halves."""
    layers = getattr(model, "layers", None)
    return bool(layers) and all(
        hasattr(layer, "feed_forward") and hasattr(getattr(layer, "self_attn", None), "project")
        for layer in layers
    ) and hasattr(model, "head")


class CompiledDecoder:
    """`decoder(model, tokens, cache) -> logits [1, V]`: compiled for one token, eager
    otherwise (and for any cache that is not a plain KVCache)."""

    def __init__(self, model) -> None:
        if not supports_compiled(model):
            raise ValueError("this model has no compiled decode step")
        # Weak: the decoder lives on its model, and a cycle through compiled functions
        # would keep a switched-away model's weights alive.
        self._model = ref = weakref.ref(model)
        n = len(model.layers)

        def first(token: mx.array, offset: mx.array):
            m = ref()
            return _enter(m.layers[0], m.model.embed_tokens(token), offset)

        def middle(i: int) -> Callable:
            def run(x: mx.array, attn: mx.array, offset: mx.array):
                layers = ref().layers
                return _enter(layers[i + 1], _leave(layers[i], x, attn), offset)

            return run

        def last(x: mx.array, attn: mx.array) -> mx.array:
            m = ref()
            return m.head(_leave(m.layers[-1], x, attn))[:, -1, :]

        self._first = mx.compile(first)
        self._middle = [mx.compile(middle(i)) for i in range(n - 1)]
        self._last = mx.compile(last)

    def __call__(self, model, tokens: Sequence[int] | mx.array, cache: list) -> mx.array:
        x = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens), dtype=mx.int32)
        if (
            x.size != 1
            or model is not self._model()
            or not all(type(c) is KVCache for c in cache)
        ):
            return eager_decode(model, x, cache)
        token = x.reshape(1, 1)
        offset = mx.array(cache[0].offset, dtype=mx.int32)
        h, q, k, v = self._first(token, offset)
        layers = self._model().layers
        for i, c in enumerate(cache):
            keys, values = c.update_and_fetch(k, v)
            attn = layers[i].self_attn.attend(q, keys, values)
            if i + 1 < len(cache):
                h, q, k, v = self._middle[i](h, attn, offset)
            else:
                return self._last(h, attn)
        raise AssertionError("unreachable: a model has at least one layer")


def _enter(layer: _Layer, h: mx.array, offset: mx.array):
    """The residual stream and this layer's rotated q, k, v for one token at `offset`."""
    q, k, v = layer.self_attn.project(layer.input_layernorm(h), offset)
    return h, q, k, v


def _leave(layer: _Layer, h: mx.array, attn: mx.array) -> mx.array:
    """Output projection, residual and feed-forward of a layer, after its attention."""
    return layer.feed_forward(h + layer.self_attn.o_proj(attn))


def decoder_for(model) -> Decoder:
    """The fastest decode step this model supports: compiled, or the eager forward.
    One per model, kept on it, so traces survive across the turns of a chat."""
    if not supports_compiled(model):
        return eager_decode
    dec = getattr(model, "_compiled_decoder", None)
    if dec is None:
        dec = CompiledDecoder(model)
        object.__setattr__(model, "_compiled_decoder", dec)  # an attribute, not a parameter
    return dec
