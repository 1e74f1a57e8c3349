"""The command protocol between rank 0 and its followers, and how layers are split.

Every message travels the ring 0 -> 1 -> ... -> n-1 -> 0 (the ring backend only talks to
neighbours): a fixed-size int32 header first, so the receiver knows the shape of what
follows, then the payload (activations, or the last rank's logits back to rank 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import IntEnum

from qwen3_chat.errors import Qwen3ChatError

HEADER_SIZE = 8
PARALLEL_MODES = ("pipeline", "tensor")  # what a run uses ("auto" is resolved before)
NO_CACHE = 0  # cache id of a forward without a cache (logits of a whole sequence)
NO_SNAPSHOT = 0  # snapshot key of the empty state (RESTORE to before any token)
# Snapshot offsets one MARK carries: a turn asks for two (chat/prompt_cache.py).
MAX_MARKS = 2
# How long rank 0 waits for a step to come back round the ring. A dead rank shows up at
# once as a lost connection; this bounds a rank that hangs: a fixed allowance plus a
# multiple of the seconds per token measured so far (prefill on a slow CPU takes long).
# QWEN3_DIST_TIMEOUT sets the fixed part.
DEFAULT_TIMEOUT_S = 8.0
FIRST_SECONDS_PER_TOKEN = 0.15  # before anything was measured
SLACK = 3.0


class Op(IntEnum):
    """Header: [op, cache, tokens, last_only, offset, key, mark, mark]."""

    FORWARD = 1  # then activations [1, tokens, hidden]
    REWIND = 2  # keep only the first `offset` tokens (KV layers; linear: undo the last update)
    FREE = 3  # forget a cache rank 0 dropped, and its snapshots
    EXIT = 4
    # The hybrid family's linear layers go back to snapshots of their state, kept on each
    # rank for its own layers and named by rank 0's `key`.
    SNAPSHOT = 5  # keep the state now as `key`
    MARK = 6  # keep the state after each of `marks` tokens when a forward passes it
    KEEP = 7  # the state MARK kept after `offset` tokens becomes `key`
    RESTORE = 8  # go back to snapshot `key` (NO_SNAPSHOT: empty), `offset` tokens
    DROP = 9  # forget snapshot `key`


class PipelineError(Qwen3ChatError):
    """A rank died, hung or failed: the distributed model cannot go on."""


@dataclass(frozen=True)
class Header:
    op: Op
    cache: int = NO_CACHE
    tokens: int = 0
    last_only: bool = False
    offset: int = 0
    key: int = NO_SNAPSHOT
    marks: tuple[int, ...] = ()

    def encode(self) -> list[int]:
        if len(self.marks) > MAX_MARKS:
            raise PipelineError(f"at most {MAX_MARKS} snapshot offsets per command")
        marks = [*self.marks, *[-1] * (MAX_MARKS - len(self.marks))]
        return [int(self.op), self.cache, self.tokens, int(self.last_only), self.offset,
                self.key, *marks]  # fmt: skip

    @classmethod
    def decode(cls, values: list[int]) -> Header:
        op, cache, tokens, last_only, offset, key, *marks = values
        return cls(Op(op), cache, tokens, bool(last_only), offset, key,
                   tuple(m for m in marks if m >= 0))  # fmt: skip


def split_layers(n_layers: int, size: int) -> list[range]:
    """Contiguous layer ranges, one per rank; earlier ranks take the remainder (rank 0 also
    embeds and the last rank also holds the norm and lm_head, so evening out beyond that
    would need the sizes of both)."""
    if size < 1 or size > n_layers:
        raise PipelineError(
            f"cannot split {n_layers} layers over {size} ranks: use at most {n_layers} ranks"
        )
    base, extra = divmod(n_layers, size)
    ranges, start = [], 0
    for r in range(size):
        end = start + base + (1 if r < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges


@dataclass
class Deadline:
    """The wait allowed for a step of `tokens` tokens, learning the pace as steps finish."""

    base: float = field(
        default_factory=lambda: float(os.environ.get("QWEN3_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    )
    per_token: float | None = None  # slowest seconds per token seen in a forward step

    def limit(self, tokens: int) -> float:
        pace = self.per_token if self.per_token is not None else FIRST_SECONDS_PER_TOKEN
        return self.base + SLACK * pace * tokens

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.per_token = max(self.per_token or 0.0, seconds / tokens)
