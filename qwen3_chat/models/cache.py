"""Per-layer KV cache: preallocated in steps, written in place, trimmable."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys/values of one attention layer, shaped [B, kv_heads, tokens, head_dim].

    Storage grows `step` tokens at a time so a decode step writes one slice in place
    instead of concatenating (copying) the whole cache.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def _grow(self, k: mx.array, v: mx.array, needed: int) -> None:
        b, h, _, dk = k.shape
        dv = v.shape[3]
        extra = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((b, h, extra, dk), k.dtype)
        new_v = mx.zeros((b, h, extra, dv), v.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            # Keep only the valid prefix (a trim may have left stale rows), then extend.
            self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        start, n = self.offset, k.shape[2]
        if self.keys is None or start + n > self.keys.shape[2]:
            self._grow(k, v, n)
        self.offset = start + n
        self.keys[..., start : self.offset, :] = k
        self.values[..., start : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (no copy); returns how many were removed."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
