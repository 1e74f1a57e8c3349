"""Rank 0's view of a pipeline-parallel model: it behaves like our Model for the engine and
the session (`model(inputs, cache=..., last_only=...)`, `make_cache()`, `.config`), runs
the first layers here and has the followers run the rest.

Each call sends a header and the activations round the ring and waits for the last rank's
logits. The wait happens on a helper thread with a deadline, so a rank that dies or hangs
becomes one PipelineError instead of a hang; Ctrl-C still reaches the caller at once.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

import mlx.core as mx

from qwen3_chat.distributed.caches import HybridPipelineCache, PipelineCache
from qwen3_chat.distributed.group import (
    NO_CACHE,
    NO_SNAPSHOT,
    Deadline,
    Header,
    Op,
    PipelineError,
)
from qwen3_chat.distributed.runner import Runner
from qwen3_chat.distributed.stage import Stage
from qwen3_chat.engine.generate import DEFAULT_PREFILL_STEP, cache_offset
from qwen3_chat.models.cache import LayerCache
from qwen3_chat.models.hybrid_config import HybridConfig

# describe(error or None for a timeout) -> the one line that names the rank/host at fault.
Describe = Callable[[BaseException | None], str]
# on_fault(line): told before the PipelineError is raised (the CLI stops every rank there).
OnFault = Callable[[str], None]


class PipelineModel:
    """Rank 0 of a pipeline: embeds, runs its layers, and gets the logits back."""

    def __init__(self, stage: Stage, group: Any, *, wire: mx.Dtype,
                 describe: Describe | None = None, runner: Runner | None = None,
                 on_fault: OnFault | None = None):  # fmt: skip
        if not stage.first:
            raise PipelineError("rank 0 must hold the first layers")
        self.stage, self.group, self.wire = stage, group, wire
        self.config = stage.config
        self.size = group.size()
        self._describe = describe or _default_describe(self.size)
        self._runner = runner or Runner()
        self._next_id = NO_CACHE + 1
        self._next_key = NO_SNAPSHOT + 1
        # (cache id, snapshot key or NO_SNAPSHOT for the whole cache) gone on rank 0, to be
        # forgotten on the followers too.
        self._dropped: list[tuple[int, int]] = []
        self._caches: weakref.WeakValueDictionary[int, PipelineCache] = (
            weakref.WeakValueDictionary()
        )
        self._failed: str | None = None
        self.on_fault = on_fault
        self.deadline = Deadline()

    # -- what the engine and the session use ------------------------------------------------
    def make_cache(self) -> list[PipelineCache]:
        cid, self._next_id = self._next_id, self._next_id + 1
        if isinstance(self.config, HybridConfig):
            size = self.config.snapshot_bytes(compute_bytes=self.wire.size)
            cache: PipelineCache = HybridPipelineCache(self, cid, self.stage.make_cache(), size)
        else:
            cache = PipelineCache(self, cid, self.stage.make_cache())
        self._caches[cid] = cache
        return [cache]

    def __call__(self, inputs: mx.array, cache: list[PipelineCache] | None = None,
                 last_only: bool = False) -> mx.array:  # fmt: skip
        """inputs int32 [1, L] -> logits [1, L, vocab] ([1, 1, vocab] with last_only)."""
        if inputs.ndim != 2 or inputs.shape[0] != 1:
            raise PipelineError("a pipeline runs one sequence at a time (batch size 1)")
        pc = cache[0] if cache else None
        n = inputs.shape[1]
        self._flush_dropped()
        header = Header(Op.FORWARD, pc.id if pc else NO_CACHE, n, last_only)
        mx.eval(inputs)  # it may be a lazy sample from the caller's stream

        def forward() -> mx.array:
            start = time.perf_counter()
            before = cache_offset(pc.local) if pc else 0
            logits = self._forward(inputs, header, pc.local if pc else None)
            mx.eval(logits, pc.state if pc else [])
            if pc is not None:
                pc.forwarded(before, n)
            self.deadline.observe(n, time.perf_counter() - start)
            return logits

        return self._wait(forward, n)

    def _forward(self, inputs: mx.array, header: Header,
                 local: list[LayerCache] | None) -> mx.array:  # fmt: skip
        """The step's graph (built on the ring thread): first layers here, logits back."""
        n_out = 1 if header.last_only else header.tokens
        h = self.stage(inputs, local, last_only=False)
        h = mx.depends(h.astype(self.wire), self._header(header))  # the header goes first
        sent = mx.distributed.send(h, 1, group=self.group)
        shape = (1, n_out, self.config.vocab_size)
        logits = mx.distributed.recv(shape, self.wire, self.size - 1, group=self.group)
        return mx.depends(logits, sent)

    def close(self) -> None:
        """Tell the followers to exit (best effort: they may be gone already)."""
        self.on_fault = None  # closing: a rank already gone is no news
        if self._failed is None:
            try:
                self._command(Header(Op.EXIT))
            except PipelineError:
                pass
            self._failed = "the distributed model was closed"

    # -- plumbing ---------------------------------------------------------------------------
    def _header(self, header: Header) -> mx.array:
        values = mx.array(header.encode(), dtype=mx.int32)
        return mx.distributed.send(values, 1, group=self.group)

    def _command(self, header: Header, here: Callable[[], None] | None = None) -> None:
        """Send `header` round the ring, after running `here` (its part on rank 0), in
        order with the steps already queued."""

        def job() -> None:
            if here is not None:
                here()
            mx.eval(self._header(header))

        self._wait(job, 0)

    def _settle(self) -> None:
        """Wait until every step already sent has finished here."""
        self._wait(lambda: None, DEFAULT_PREFILL_STEP)  # at most a prefill chunk in flight

    def _new_key(self) -> int:
        key, self._next_key = self._next_key, self._next_key + 1
        return key

    def _forget(self, cache_id: int, key: int) -> None:
        self._dropped.append((cache_id, key))  # from a finalizer: no communication here

    def _flush_dropped(self) -> None:
        while self._dropped:
            cache_id, key = self._dropped.pop(0)
            if key == NO_SNAPSHOT:
                self._command(Header(Op.FREE, cache_id))
            elif (pc := self._caches.get(cache_id)) is not None:  # else FREE drops it all
                pc._run(Header(Op.DROP, cache_id, key=key))

    def _wait(self, job: Callable[[], Any], tokens: int) -> Any:
        """Run `job` on the ring thread, waiting as long as a step of `tokens` may take."""
        if self._failed is not None:
            raise PipelineError(self._failed)
        try:
            ok, result = self._runner.submit(job).wait(self.deadline.limit(tokens))
        except RuntimeError as e:  # the ring reports a lost peer as a RuntimeError
            self._fault(self._describe(e))
        if not ok:
            self._fault(self._describe(None))
        return result

    def _fault(self, line: str) -> NoReturn:
        self._failed = line
        if self.on_fault is not None:
            self.on_fault(line)
        raise PipelineError(line)


def _default_describe(size: int) -> Describe:
    def describe(error: BaseException | None) -> str:
        who = "rank 1" if size == 2 else f"ranks 1-{size - 1}"
        if error is None:
            return f"distributed: no answer from {who} in time; stopping"
        return f"distributed: lost contact with {who} ({error}); stopping"

    return describe
