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

HEADER_SIZE = 6
PARALLEL_MODES = ("pipeline", "tensor")  # what a run uses ("auto" is resolved before)
NO_CACHE = 0  # cache id of a forward without a cache (logits of a whole sequence)
# How long rank 0 waits for a step to come back round the ring. A dead rank shows up at
# once as a lost connection; this bounds a rank that hangs: a fixed allowance plus a
# multiple of the seconds per token measured so far (prefill on a slow CPU takes long).
# QWEN3_DIST_TIMEOUT sets the fixed part.
DEFAULT_TIMEOUT_S = 8.0
FIRST_SECONDS_PER_TOKEN = 0.15  # before anything was measured
SLACK = 3.0

class Op(IntEnum):
    FORWARD = 1  # [op, cache, tokens, last_only, 0, 0] then activations [1, tokens, hidden]
    REWIND = 2  # [op, cache, 0, 0, offset, 0]: keep only the first `offset` tokens
    FREE = 3  # [op, cache, ...]: forget a cache rank 0 dropped
    EXIT = 4


class PipelineError(Qwen3ChatError):
    """A rank died, hung or failed: the distributed model cannot go on."""


@dataclass(frozen=True)
class Header:
    op: Op
    cache: int = NO_CACHE
    tokens: int = 0
    last_only: bool = False
    offset: int = 0

    def encode(self) -> list[int]:
        return [int(self.op), self.cache, self.tokens, int(self.last_only), self.offset, 0]

    @classmethod
    def decode(cls, values: list[int]) -> Header:
        op, cache, tokens, last_only, offset, _ = values
        return cls(Op(op), cache, tokens, bool(last_only), offset)


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
