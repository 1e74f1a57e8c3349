"""Every rank's start (join the group, check the model, load the stage) and the followers'
loop: receive rank 0's commands round the ring and run them until told to exit.

Run as `python -m qwen3_chat.distributed.worker --model PATH ...` by the launcher; the
exit status says why a follower stopped (see the codes below).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen3_chat.distributed.caches import CacheStore
from qwen3_chat.distributed.group import (
    HEADER_SIZE,
    NO_CACHE,
    PARALLEL_MODES,
    Header,
    Op,
    PipelineError,
)
from qwen3_chat.distributed.hosts import model_digest
from qwen3_chat.distributed.stage import Stage, load_stage
from qwen3_chat.distributed.tensor import BroadcastSteps, load_tensor_stage
from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.models.cache import LayerCache
from qwen3_chat.weights.loader import FLOAT_DTYPES

# Status codes every rank reports in the start-up barriers (and exits with, as followers).
OK, NO_MODEL, LOAD_FAILED = 0, 2, 3


@dataclass
class Joined:
    """This process's place in the group, and its stage once loaded."""

    group: Any
    stage: Stage
    parallel: str = "pipeline"

    def steps(self, wire: mx.Dtype) -> Any:
        """How a follower receives rank 0's commands and runs a step."""
        if self.parallel == "tensor":
            return BroadcastSteps(self.stage, self.group)
        return RingSteps(self.stage, self.group, wire)


def agree(group: Any, code: int) -> list[int]:
    """Every rank's status code (an all_sum of one-hot vectors: also a barrier)."""
    codes = mx.zeros((group.size(),), dtype=mx.int32)
    codes[group.rank()] = code
    out = mx.distributed.all_sum(codes, group=group)
    mx.eval(out)
    return [int(c) for c in out.tolist()]


def join(group: Any, path: Path, digest: str, *, bits: int | None, dtype: mx.Dtype,
         names: list[str], parallel: str = "pipeline") -> Joined:  # fmt: skip
    """Check that every rank has the same model, then load each rank's share.

    A rank without the model fails the first barrier, so nobody starts loading."""
    have = model_digest(path)
    codes = agree(group, OK if have == digest else NO_MODEL)
    missing = [names[r] for r, c in enumerate(codes) if c == NO_MODEL]
    if missing:
        raise PipelineError(f"distributed: {', '.join(missing)}: model {path} missing or "
                            f"different (config/index sha256 differs)")  # fmt: skip
    stage, error = None, ""
    try:
        if parallel == "tensor":
            stage = load_tensor_stage(path, group, bits=bits, dtype=dtype)
        else:
            stage = load_stage(path, group.rank(), group.size(), bits=bits, dtype=dtype)
    except Qwen3ChatError as e:
        error = str(e)
    codes = agree(group, OK if stage is not None else LOAD_FAILED)
    failed = [names[r] for r, c in enumerate(codes) if c == LOAD_FAILED]
    if failed:
        raise PipelineError(f"distributed: loading failed on {', '.join(failed)}"
                            + (f": {error}" if error else ""))  # fmt: skip
    return Joined(group, stage, parallel)  # type: ignore[arg-type]


class RingSteps:
    """Pipeline: headers and activations come from the previous rank and go to the next."""

    def __init__(self, stage: Stage, group: Any, wire: mx.Dtype):
        self.stage, self.group, self.wire = stage, group, wire
        rank, size = group.rank(), group.size()
        self.prev, self.next, self.last = rank - 1, (rank + 1) % size, rank == size - 1

    def header(self) -> Header:
        raw = mx.distributed.recv((HEADER_SIZE,), mx.int32, self.prev, group=self.group)
        if not self.last:  # pass it on first, so the next rank is ready as soon as we are
            raw = mx.distributed.send(raw, self.next, group=self.group)
        mx.eval(raw)
        return Header.decode(raw.tolist())

    def forward(self, header: Header, cache: list[LayerCache] | None) -> None:
        shape = (1, header.tokens, self.stage.config.hidden_size)
        x = mx.distributed.recv(shape, self.wire, self.prev, group=self.group)
        out = self.stage(x, cache, header.last_only).astype(self.wire)
        sent = mx.distributed.send(out, self.next, group=self.group)
        mx.eval(sent, [c.state for c in cache or []])


def follow(stage: Stage, steps: Any) -> None:
    """Run rank 0's commands until EXIT (a lost connection raises instead)."""
    store = CacheStore(stage.make_cache)
    while True:
        header = steps.header()
        if header.op is Op.EXIT:
            return
        if header.op is Op.FORWARD:
            cache = None if header.cache == NO_CACHE else store.layers(header.cache)
            steps.forward(header, cache)
        else:
            store.run(header)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qwen3-worker", description=__doc__)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--digest", required=True)
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), default="float32")
    p.add_argument("--backend", default="ring")
    p.add_argument("--names", default="", help="comma-separated host of each rank")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="pipeline")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    group = mx.distributed.init(strict=True, backend=args.backend)
    names = args.names.split(",") if args.names else [f"rank {r}" for r in range(group.size())]
    dtype = FLOAT_DTYPES[args.dtype]
    try:
        joined = join(group, args.model, args.digest, bits=args.bits, dtype=dtype, names=names,
                      parallel=args.parallel)  # fmt: skip
        follow(joined.stage, joined.steps(dtype))
    except Qwen3ChatError as e:
        print(f"rank {group.rank()}: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # the ring lost rank 0: nothing left to follow
        print(f"rank {group.rank()}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
