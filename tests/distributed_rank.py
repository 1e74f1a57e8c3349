"""One rank of the distributed tests, started by mlx.launch (see test_distributed.py).

Rank 0 runs the checks through the library (logits of a whole sequence, a cached
prefill, greedy tokens through stream_generate and ChatSession) and writes them as JSON;
the other ranks follow its commands. argv: MODEL_DIR OUT_JSON; with MISSING_ON_RANK=r,
rank r looks for the model where there is none; PARALLEL=tensor splits by heads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen3_chat.distributed.group import PipelineError
from qwen3_chat.distributed.hosts import model_digest
from qwen3_chat.distributed.pipeline import PipelineModel
from qwen3_chat.distributed.tensor import TensorModel
from qwen3_chat.distributed.worker import follow, join

PARALLEL = os.environ.get("PARALLEL", "pipeline")


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    group = mx.distributed.init(strict=True, backend="ring")
    rank, size = group.rank(), group.size()
    names = [f"127.0.0.1#{r}" for r in range(size)]
    digest = model_digest(model_dir)
    if os.environ.get("MISSING_ON_RANK") == str(rank):  # this "host" lacks the model
        model_dir = model_dir.parent / "absent"
    try:
        joined = join(group, model_dir, digest, bits=None, dtype=mx.float32, names=names,
                      parallel=PARALLEL)  # fmt: skip
    except PipelineError as e:
        if rank == 0:
            Path(out).write_text(json.dumps({"error": str(e)}))
        return
    held = {"rank": rank, "names": joined.stage.parameter_names(),
            "nbytes": joined.stage.nbytes, "active": mx.get_active_memory()}  # fmt: skip
    Path(f"{out}.rank{rank}").write_text(json.dumps(held))
    if rank != 0:
        follow(joined.stage, joined.steps(mx.float32))
        return
    kind = TensorModel if PARALLEL == "tensor" else PipelineModel
    model = kind(joined.stage, group, wire=mx.float32)
    try:
        run(model, model_dir, out)
    finally:
        model.close()


def run(model: PipelineModel, model_dir: Path, out: Path) -> None:
    ids = mx.array([[1, 5, 9, 42, 7, 300, 11, 2, 64, 3]], dtype=mx.int32)
    full = model(ids)
    cache = model.make_cache()
    prefill = model(ids[:, :7], cache=cache, last_only=True)
    step = model(ids[:, 7:8], cache=cache, last_only=True)
    cache[0].trim(1)  # rewind through the followers, then the same step again
    again = model(ids[:, 7:8], cache=cache, last_only=True)
    logits = {"full": full, "prefill": prefill, "step": step, "again": again}
    if hasattr(cache[0], "snapshot"):  # a hybrid model: linear layers go back to snapshots
        logits.update(snapshots(model, ids))
    # Logits as .npy beside the JSON: a full-vocabulary row is too big for JSON.
    for name, a in logits.items():
        np.save(f"{out}.{name}.npy", np.array(a))
    result: dict = {}
    if (model_dir / "tokenizer.json").exists():
        result["chat"], result["prefilled"] = chat(model, model_dir)
    Path(out).write_text(json.dumps(result))


def snapshots(model: PipelineModel, ids: mx.array) -> dict[str, mx.array]:
    """Every snapshot command: a point asked for inside a prefill, one taken after it, a
    restore to each and to empty, with a snapshot dropped on the way; each followed by
    the step that must give one process's logits (see test_distributed_hybrid.py)."""
    cache = model.make_cache()
    (pc,) = cache
    pc.request_snapshots([4])  # inside the prefill below: each layer splits its scan there
    model(ids[:, :7], cache=cache, last_only=True)
    at4 = pc.take_snapshots()[4]
    at7 = pc.snapshot()
    dropped = pc.snapshot()
    model(ids[:, 7:8], cache=cache, last_only=True)
    del dropped  # its DROP goes round with the next forward
    pc.restore(at4)
    from4 = model(ids[:, 4:8], cache=cache, last_only=True)
    pc.restore(at7)
    from7 = model(ids[:, 7:8], cache=cache, last_only=True)
    pc.restore(None)
    fresh = model(ids[:, :7], cache=cache, last_only=True)
    return {"from4": from4, "from7": from7, "fresh": fresh}


def chat(model: PipelineModel, model_dir: Path) -> tuple[list[list[int]], list[int]]:
    """Greedy turns through ChatSession (cache reuse, /retry, /undo): tokens and prefills."""
    from qwen3_chat.chat.session import ChatSession
    from qwen3_chat.chat.tokenizer import Tokenizer
    from qwen3_chat.engine.events import Finished

    tok = Tokenizer.from_dir(model_dir)
    session = ChatSession(model, tok, sampling_overrides={"temperature": 0.0}, max_tokens=8,
                          budget=None)  # fmt: skip
    turns, prefilled = [], []

    def finish(events) -> None:
        fin = [e for e in events if isinstance(e, Finished)][-1]
        turns.append(list(fin.token_ids))
        prefilled.append(fin.stats.prefill_tokens)

    finish(session.send("Hello there"))
    finish(session.send("And again?"))
    if os.environ.get("RETRY"):
        finish(session.retry())
        session.undo()
        finish(session.send("Something else"))
    return turns, prefilled


if __name__ == "__main__":
    main()
