"""A conversation's cache when its layers live on several ranks.

Rank 0 holds its own layers' caches in a `PipelineCache`; every other rank keeps its
layers' caches by the same id. A rewind is one command that every rank applies to its own
layers, in order with the forwards. The hybrid family's linear layers cannot trim: they go
back to snapshots, which each rank keeps of its own layers under a key rank 0 hands out
(`HybridPipelineCache`), so `Snapshots` and `ChatSession` rewind a split model as they
rewind a whole one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from qwen3_chat.distributed.group import NO_SNAPSHOT, Header, Op
from qwen3_chat.engine.generate import cache_offset, rewind
from qwen3_chat.models.cache import LayerCache, SnapshotLayer, layer_snapshots, rewind_layers

# One rank's snapshots of one conversation's layers: key -> a snapshot per layer (None: KV).
Kept = dict[int, list[Any]]


def apply(header: Header, layers: list[LayerCache], kept: Kept) -> None:
    """Run a cache command on this rank's layers (every rank runs the same commands)."""
    op = header.op
    if op is Op.REWIND:
        rewind(layers, header.offset)
    elif op is Op.SNAPSHOT:
        kept[header.key] = layer_snapshots(layers)
    elif op is Op.MARK:
        for c in layers:
            if isinstance(c, SnapshotLayer):
                c.request_snapshots(header.marks)
    elif op is Op.KEEP:  # every rank ran the same forwards: each layer reached the offset
        kept[header.key] = [c.marked[header.offset] if isinstance(c, SnapshotLayer) else None
                            for c in layers]  # fmt: skip
    elif op is Op.RESTORE:
        snap = None if header.key == NO_SNAPSHOT else kept[header.key]
        rewind_layers(layers, header.offset, snap)
    elif op is Op.DROP:
        kept.pop(header.key, None)


@dataclass
class CacheStore:
    """A follower's caches and snapshots, by rank 0's cache id."""

    make_cache: Callable[[], list[LayerCache]]
    caches: dict[int, list[LayerCache]] = field(default_factory=dict)
    kept: dict[int, Kept] = field(default_factory=dict)

    def layers(self, cache_id: int) -> list[LayerCache]:
        if cache_id not in self.caches:
            self.caches[cache_id] = self.make_cache()
        return self.caches[cache_id]

    def run(self, header: Header) -> None:
        if header.op is Op.FREE:
            self.caches.pop(header.cache, None)
            self.kept.pop(header.cache, None)
        else:  # rank 0 may ask for snapshots before the cache's first forward
            apply(header, self.layers(header.cache), self.kept.setdefault(header.cache, {}))


class PipelineCache:
    """The KV cache of one conversation: rank 0's layers here, the followers' kept by id.

    `owner` is rank 0's model: `_settle()` waits for steps in flight, `_command(header, job)`
    sends a command round the ring after running `job` here, in order with the steps,
    `_forget(cache_id, key)` is told when a cache or snapshot is gone."""

    def __init__(self, owner: Any, cache_id: int, local: list[LayerCache]):
        self._owner, self.id, self.local = owner, cache_id, local
        self.kept: Kept = {}  # rank 0's part of each snapshot
        weakref.finalize(self, owner._forget, cache_id, NO_SNAPSHOT)

    @property
    def offset(self) -> int:
        self._owner._settle()  # a step cut off by Ctrl-C may still be filling the layers
        return cache_offset(self.local)

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def trim(self, n: int) -> int:
        n = max(0, min(self.offset, n))
        if n:
            self._run(Header(Op.REWIND, self.id, offset=self.offset - n))
        return n

    def forwarded(self, before: int, tokens: int) -> None:
        """Told by rank 0's model after a forward of `tokens` from `before` tokens."""

    def _run(self, header: Header) -> None:
        """`header` on rank 0's layers and, in the same order, on every follower's."""
        self._owner._command(header, lambda: apply(header, self.local, self.kept))

    @property
    def state(self) -> list[mx.array]:
        return [a for c in self.local for a in c.state]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.local)


@dataclass(eq=False)
class RemoteSnapshot:
    """A snapshot of every rank's linear layers, named `key` on each rank."""

    offset: int
    key: int
    nbytes: int  # on all ranks together


class HybridPipelineCache(PipelineCache, SnapshotLayer):
    """A hybrid model's cache across ranks: like one linear layer to `Snapshots`, it trims
    only its last update and otherwise goes back to snapshots kept on every rank."""

    def __init__(self, owner: Any, cache_id: int, local: list[LayerCache], snapshot_bytes: int):
        super().__init__(owner, cache_id, local)
        self.snapshot_bytes = snapshot_bytes
        self._undo: int | None = None  # where the last forward started: trim goes back there
        self._asked: tuple[int, ...] = ()
        self._reached: set[int] = set()

    def forwarded(self, before: int, tokens: int) -> None:
        self._undo = before
        self._reached |= {o for o in self._asked if before < o <= before + tokens}

    def can_trim(self, n: int) -> bool:
        return n == 0 or (self._undo is not None and self.offset - self._undo == n)

    def trim(self, n: int) -> int:
        if n <= 0 or not self.can_trim(n):
            return 0
        self._undo = None
        return super().trim(n)

    def _new(self, offset: int) -> RemoteSnapshot:
        snap = RemoteSnapshot(offset, self._owner._new_key(), self.snapshot_bytes)
        weakref.finalize(snap, self._owner._forget, self.id, snap.key)
        return snap

    def snapshot(self) -> RemoteSnapshot:
        snap = self._new(self.offset)
        self._run(Header(Op.SNAPSHOT, self.id, key=snap.key))
        return snap

    def restore(self, snap: RemoteSnapshot | None) -> None:
        key, offset = (NO_SNAPSHOT, 0) if snap is None else (snap.key, snap.offset)
        self._run(Header(Op.RESTORE, self.id, offset=offset, key=key))
        self._undo = None

    def request_snapshots(self, offsets: Sequence[int]) -> None:
        self._asked, self._reached = tuple(offsets), set()
        self._run(Header(Op.MARK, self.id, marks=self._asked))

    def take_snapshots(self) -> dict[int, RemoteSnapshot]:
        self._owner._settle()  # forwards still in flight may reach more of them
        out = {}
        for offset in sorted(self._reached):
            out[offset] = snap = self._new(offset)
            self._run(Header(Op.KEEP, self.id, offset=offset, key=snap.key))
        if self._asked:
            self.request_snapshots(())
        return out
