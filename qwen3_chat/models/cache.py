"""Per-layer caches: the KV cache of attention layers (preallocated, trimmable) and the
conv + recurrent state of linear (Gated DeltaNet) layers (snapshots, not trim)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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

    def can_trim(self, n: int) -> bool:
        """Keys and values are kept per token, so any suffix can be forgotten."""
        return 0 <= n <= self.offset


@dataclass(frozen=True)
class LinearSnapshot:
    """A linear layer's state after `offset` tokens (arrays are immutable: no copy needed)."""

    offset: int
    conv: mx.array | None
    recurrent: mx.array | None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.conv, self.recurrent) if a is not None)


class SnapshotLayer:
    """A cache entry that cannot trim back to any token, only to snapshots of its state:
    a Gated DeltaNet layer here, or a pipeline's layers on other ranks (distributed)."""

    offset: int

    def snapshot(self) -> Any:
        """The state now (an object with `offset` and `nbytes`)."""
        raise NotImplementedError

    def restore(self, snap: Any | None) -> None:
        """Go back to `snap` (None: empty, before any token)."""
        raise NotImplementedError

    def request_snapshots(self, offsets: Sequence[int]) -> None:
        """Keep the state after each of `offsets` tokens when an update passes it."""
        raise NotImplementedError

    def take_snapshots(self) -> dict[int, Any]:
        """The requested states reached since the request (offset -> snapshot); the
        request ends."""
        raise NotImplementedError


class LinearCache(SnapshotLayer):
    """State of one Gated DeltaNet layer: the conv window and the recurrent matrix.

    The recurrent state folds every token in, so it cannot be trimmed back to an earlier
    token. It can only go back to a snapshot taken there, and by exactly the last update
    (kept as one snapshot), which is what a speculative decode step needs to be undone.
    """

    def __init__(self) -> None:
        self.conv: mx.array | None = None  # [B, kernel - 1, channels]: the last inputs
        self.recurrent: mx.array | None = None  # [B, heads, Dk, Dv], float32
        self.offset = 0
        self._previous: LinearSnapshot | None = None
        # Asked for, the state after each offset in `snapshot_at` is kept in `marked` (even
        # inside a prefill chunk: the layer splits its work there), for a later turn.
        self.snapshot_at: tuple[int, ...] = ()
        self.marked: dict[int, LinearSnapshot] = {}

    def splits_for_snapshots(self, tokens: int) -> list[int]:
        """Where inside an update of `tokens` requested snapshots fall (1..tokens-1)."""
        return sorted(o - self.offset for o in self.snapshot_at if 0 < o - self.offset < tokens)

    def mark(self, conv: mx.array, recurrent: mx.array, tokens: int) -> None:
        """The state `tokens` into the update now being made (see splits_for_snapshots)."""
        self.marked[self.offset + tokens] = LinearSnapshot(self.offset + tokens, conv, recurrent)

    def update(self, conv: mx.array, recurrent: mx.array, tokens: int) -> None:
        self._previous = self.snapshot()
        self.conv, self.recurrent = conv, recurrent
        self.offset += tokens
        if self.offset in self.snapshot_at:
            self.marked[self.offset] = self.snapshot()

    def snapshot(self) -> LinearSnapshot:
        return LinearSnapshot(self.offset, self.conv, self.recurrent)

    def restore(self, snap: LinearSnapshot | None) -> None:
        snap = snap or LinearSnapshot(0, None, None)
        self.offset, self.conv, self.recurrent = snap.offset, snap.conv, snap.recurrent
        self._previous = None

    def request_snapshots(self, offsets: Sequence[int]) -> None:
        self.snapshot_at, self.marked = tuple(offsets), {}

    def take_snapshots(self) -> dict[int, LinearSnapshot]:
        marked, self.snapshot_at, self.marked = self.marked, (), {}
        return marked

    def can_trim(self, n: int) -> bool:
        return n == 0 or (self._previous is not None and self.offset - self._previous.offset == n)

    def trim(self, n: int) -> int:
        """Undo the last update if it was exactly `n` tokens; otherwise remove nothing."""
        if n <= 0 or not self.can_trim(n):
            return 0
        self.restore(self._previous)  # type: ignore[arg-type]
        return n

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv, self.recurrent) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


LayerCache = KVCache | LinearCache


def can_trim(cache: list[LayerCache], n: int) -> bool:
    """Whether every layer can forget its last `n` tokens (hybrid models usually cannot)."""
    return all(c.can_trim(n) for c in cache)


def rewind_layers(cache: Sequence, target: int, snap: list | None = None) -> None:
    """Put every layer at `target` tokens: KV layers by trimming, the others from `snap`
    (their snapshots at `target`, None entries for KV layers) or to empty when target is 0."""
    for i, c in enumerate(cache):
        if isinstance(c, SnapshotLayer):
            c.restore(snap[i] if snap is not None else None)
        else:
            c.trim(c.offset - target)


def layer_snapshots(cache: Sequence) -> list:
    """Every snapshot-keeping layer's state now (None for KV layers)."""
    return [c.snapshot() if isinstance(c, SnapshotLayer) else None for c in cache]


@dataclass
class Snapshots:
    """Linear-layer states at chosen token offsets, so a hybrid model's cache can go back.

    Bounded: at most `max_count` points and `max_bytes` in all (oldest dropped first). A
    point at offset o is valid for the token ids the cache held then; points past a rewind
    are dropped, so every point kept is a prefix of what the cache holds.
    """

    # Three points a turn (where its prefill starts, the end of its last message, before its
    # last prompt token) cover the last two turns: next turn, /retry, /undo. A 27B-class
    # model's point is ~150 MB.
    max_count: int = 6
    max_bytes: int = 1024**3
    points: list[tuple[int, list[Any]]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, snaps in self.points for s in snaps if s is not None)

    def add(self, cache: Sequence) -> None:
        """Remember every linear layer's state now (all layers must be at one offset)."""
        self._keep(min(c.offset for c in cache), layer_snapshots(cache))

    def request(self, cache: Sequence, offsets: Sequence[int]) -> None:
        """Have the linear layers keep their state after each of `offsets` tokens."""
        for c in cache:
            if isinstance(c, SnapshotLayer):
                c.request_snapshots(offsets)

    def collect(self, cache: Sequence) -> None:
        """Keep each requested state every linear layer reached (and still holds)."""
        linear = [c for c in cache if isinstance(c, SnapshotLayer)]
        marks = [c.take_snapshots() for c in linear]
        if not linear:
            return
        held = min(c.offset for c in cache)
        for offset in sorted(set.intersection(*(set(m) for m in marks))):
            if offset <= held:
                it = iter(m[offset] for m in marks)
                self._keep(
                    offset, [next(it) if isinstance(c, SnapshotLayer) else None for c in cache]
                )

    def _keep(self, offset: int, snaps: list) -> None:
        if all(s is None for s in snaps):
            return
        self.points = [p for p in self.points if p[0] != offset] + [(offset, snaps)]
        self.points.sort(key=lambda p: p[0])
        while self.points and (len(self.points) > self.max_count or self.nbytes > self.max_bytes):
            self.points.pop(0)

    def rewind(self, cache: list[LayerCache], target: int) -> int:
        """Go back to `target` tokens, or to the latest snapshot before it (or to nothing);
        returns the offset every layer is at now."""
        held = min((c.offset for c in cache), default=0)
        target = min(target, held)
        if all(c.can_trim(c.offset - target) for c in cache):
            for c in cache:
                c.trim(c.offset - target)
        else:
            usable = [p for p in self.points if p[0] <= target]
            target, snap = usable[-1] if usable else (0, None)
            rewind_layers(cache, target, snap)
        self.points = [p for p in self.points if p[0] <= target]
        return target
