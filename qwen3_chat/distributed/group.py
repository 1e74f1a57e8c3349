"""The command protocol between rank 0 and its followers, and how layers are split.

Every message travels the ring 0 -> 1 -> ... -> n-1 -> 0 (the ring backend only talks to
neighbours): a fixed-size int32 header first, so the receiver knows the shape of what
follows, then the payload (activations, or the last rank's logits back to rank 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum

from qwen3_chat.errors import Qwen3ChatError

HEADER_SIZE = 6
PARALLEL_MODES = ("pipeline", "tensor")  # what a run uses ("auto" is resolved before)
NO_CACHE = 0  # cache id of a forward without a cache (logits of a whole sequence)
# Seconds a step may take before rank 0 calls the pipeline stalled: a dead rank shows up
# at once as a lost connection; this bounds a rank that hangs. QWEN3_DIST_TIMEOUT overrides.
DEFAULT_TIMEOUT_S = 8.0
PER_TOKEN_TIMEOUT_S = 0.05


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


def step_timeout(tokens: int) -> float:
    """How long rank 0 waits for one command to come back round the ring."""
    base = float(os.environ.get("QWEN3_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    return base + PER_TOKEN_TIMEOUT_S * tokens

