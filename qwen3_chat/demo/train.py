"""Train the tiny offline demo model (deterministic: seeded data, init and order; float32 CPU).

Regenerate the committed folder in seven stages, each on fresh conversations and resumed from
the one before: three on the base phrasings (2000 steps, then 1000 and 1000 at lower rates),
one adding EXTRA_PHRASINGS (--extra), three adding composed phrasings (--mix: numbers anywhere
in the message); the last stage's step-1000 checkpoint scored best on validation. About
38 + 10 + 8 + 17 + 20 + 20 + 12 minutes on 2 cores shared with other jobs:

    NUMPY_BLAS=$(python -c "import glob, numpy, os; \
        print(glob.glob(os.path.dirname(numpy.__file__) + '.libs/libscipy_openblas64_*.so')[0])")
    gcc -O2 -shared -fPIC qwen3_chat/demo/sgemm_shim.c "$NUMPY_BLAS" \
        -Wl,-rpath,"$(dirname "$NUMPY_BLAS")" -o /tmp/sgemm_shim.so
    export OPENBLAS_NUM_THREADS=1 LD_PRELOAD=/tmp/sgemm_shim.so
    T="python -m qwen3_chat.demo.train"
    $T --out /tmp/demo-1
    $T --resume /tmp/demo-1 --seed 1 --steps 1000 --lr 1e-3 --out /tmp/demo-2
    $T --resume /tmp/demo-2 --seed 2 --steps 1000 --lr 5e-4 --out /tmp/demo-3
    $T --resume /tmp/demo-3 --extra --seed 21 --steps 2000 --lr 3e-4 --out /tmp/demo-4
    $T --resume /tmp/demo-4 --extra --mix --seed 31 --steps 2500 --lr 3e-4 --out /tmp/demo-5
    $T --resume /tmp/demo-5 --extra --mix --seed 41 --steps 2500 --lr 2e-4 --out /tmp/demo-6
    $T --resume /tmp/demo-6 --extra --mix --seed 51 --steps 2000 --lr 1e-4 --save-every 1000 \
        --out /tmp/demo-7
    cp /tmp/demo-7-step1000/* qwen3_chat/demo/model/

The shim is only a speed-up for Linux, where the mlx[cpu] wheel links the reference BLAS
(a training step is ~5x slower without it); one OpenBLAS thread, because spinning threads on
oversubscribed cores made its matmuls ~4x slower. Without the two exports the same commands
train the same recipe (float results may differ in the last bits with another BLAS).

Evaluate a folder on held-out questions (greedy, both modes) with:

    python -m qwen3_chat.demo.train --eval qwen3_chat/demo/model -n all

Checkpoints are chosen with --eval FOLDER --validation (questions the held-out test never
asks; --save-every N also writes OUT-stepN folders), and only then measured on the test.
Validation, 300 questions per mode, right in thinking / non-thinking: stage 3 234 / 247, stage 4
269 / 284, stage 5 280 / 287, stage 6 290 / 288, stage 7 at step 1000 (committed) 292 / 295,
at 1500 291 / 293, at 2000 293 / 291.

Conversations are packed into fixed-length rows (no padding between them, one shape, so the
compiled step is traced once) and the loss covers the assistant replies only.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from tokenizers import Tokenizer as HFTokenizer

from qwen3_chat.demo import data
from qwen3_chat.engine.defaults import QWEN_SAMPLING, THINKING
from qwen3_chat.files import write_json
from qwen3_chat.models.config import ModelConfig
from qwen3_chat.models.qwen3 import Model

MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "float16",
}


@dataclass
class TrainConfig:
    seed: int = 0
    examples: int = 40000
    vocab_size: int = 512
    batch_size: int = 8
    seq_len: int = 256  # every row is packed to exactly this many tokens
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    extra: bool = False  # also ask with data.EXTRA_PHRASINGS (stage 4 on)
    mix: bool = False  # also ask with data.composed_phrasing (stage 5 on)
    save_every: int = 0  # also write OUT-stepN every this many steps, to choose on validation


Encoded = tuple[list[int], list[int]]


def pack(encoded: list[Encoded], seq_len: int, sep: list[int], pad_id: int,
         rng: random.Random) -> list[Encoded]:  # fmt: skip
    """One epoch of rows: whole conversations in a seeded order, joined by `sep` (the newline
    after <|im_end|>, not trained on) until the next would not fit, then padded."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    rows: list[Encoded] = []
    ids: list[int] = []
    mask: list[int] = []
    for i in order:
        x, m = encoded[i]
        if len(x) > seq_len:
            raise ValueError(f"conversation of {len(x)} tokens exceeds seq_len {seq_len}")
        if len(ids) + len(sep) + len(x) > seq_len:
            rows.append((ids + [pad_id] * (seq_len - len(ids)), mask + [0] * (seq_len - len(ids))))
            ids, mask = [], []
        if ids:
            ids, mask = ids + sep, mask + [0] * len(sep)
        ids, mask = ids + x, mask + m
    if ids:
        rows.append((ids + [pad_id] * (seq_len - len(ids)), mask + [0] * (seq_len - len(ids))))
    return rows


def batches(encoded: list[Encoded], cfg: TrainConfig, sep: list[int],
            pad_id: int) -> Iterator[tuple[mx.array, mx.array]]:  # fmt: skip
    """Endless deterministic [batch, seq_len] batches, repacked in a new order each epoch."""
    rng = random.Random(cfg.seed + 1)
    while True:
        rows = pack(encoded, cfg.seq_len, sep, pad_id, rng)
        for s in range(0, len(rows) - cfg.batch_size + 1, cfg.batch_size):
            group = rows[s : s + cfg.batch_size]
            yield (mx.array([r[0] for r in group], dtype=mx.int32),
                   mx.array([r[1] for r in group], dtype=mx.float32))  # fmt: skip


def loss_fn(model: Model, ids: mx.array, mask: mx.array) -> mx.array:
    """Mean next-token cross entropy over the assistant reply tokens only."""
    logits = model(ids[:, :-1])
    target, m = ids[:, 1:], mask[:, 1:]
    ce = nn.losses.cross_entropy(logits, target, reduction="none")
    return (ce * m).sum() / m.sum()


def save_folder(model: Model, tok, out: Path, model_config: dict[str, Any]) -> None:
    """Write a Hugging Face-layout Qwen3 folder (float16 weights) atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    cfg = {**model_config, "vocab_size": tok.get_vocab_size()}
    cfg["bos_token_id"] = tok.token_to_id("<|endoftext|>")
    cfg["eos_token_id"] = tok.token_to_id("<|im_end|>")
    write_json(tmp / "config.json", cfg)
    data.write_tokenizer(tok, tmp)
    gen = {
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "do_sample": True,
        **{k: QWEN_SAMPLING[THINKING][k] for k in ("temperature", "top_k", "top_p")},
    }
    write_json(tmp / "generation_config.json", gen)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def train(
    cfg: TrainConfig,
    out: Path | None,
    log=print,
    model_config: dict[str, Any] | None = None,
    init: Path | None = None,
) -> dict[str, float]:
    """Train from scratch, or go on from the folder `init` (its weights and tokenizer, fresh
    conversations from cfg.seed); write the folder to `out` (unless None)."""
    model_config = {**MODEL_CONFIG, **(model_config or {})}
    mx.set_default_device(mx.cpu)  # deterministic and float32: the CPU path
    mx.random.seed(cfg.seed)
    t_data = time.perf_counter()
    examples = data.generate(cfg.examples, cfg.seed, cfg.extra, cfg.mix)
    if init is None:
        tok = data.train_tokenizer(examples, cfg.vocab_size)
    else:
        tok = HFTokenizer.from_file(str(init / "tokenizer.json"))
    chat = data.chat_tokenizer(tok)
    encoded = [data.encode_example(chat, ex) for ex in examples]
    # The few longest multi-turn conversations would not fit a row: leave them out.
    encoded = [e for e in encoded if len(e[0]) <= cfg.seq_len]
    model = Model(ModelConfig.from_dict({**model_config, "vocab_size": tok.get_vocab_size()}))
    if init is not None:
        from qwen3_chat.weights.loader import load_model

        model.update(load_model(init, dtype=mx.float32).parameters())
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_tokens = sum(len(e[0]) for e in encoded)
    log(f"{len(encoded)} conversations, {n_tokens} tokens, vocab {tok.get_vocab_size()}, "
        f"{n_params} parameters, data ready in {time.perf_counter() - t_data:.0f}s")  # fmt: skip

    schedule = optim.join_schedules(
        [
            optim.linear_schedule(cfg.lr / 20, cfg.lr, cfg.warmup),
            optim.cosine_decay(cfg.lr, max(cfg.steps - cfg.warmup, 1), cfg.lr / 20),
        ],
        [cfg.warmup],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(ids: mx.array, mask: mx.array) -> mx.array:
        loss, grads = grad_fn(model, ids, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    sep = chat.encode("\n")
    stream = batches(encoded, cfg, sep, tok.token_to_id("<|endoftext|>"))
    t0, avg = time.perf_counter(), math.nan
    for i in range(1, cfg.steps + 1):
        ids, mask = next(stream)
        loss = step(ids, mask)
        mx.eval(state, loss)
        avg = loss.item() if math.isnan(avg) else 0.95 * avg + 0.05 * loss.item()
        if i % 50 == 0 or i == cfg.steps:
            log(f"step {i}/{cfg.steps} loss {loss.item():.4f} avg {avg:.4f} "
                f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
        if out is not None and cfg.save_every and i % cfg.save_every == 0 and i < cfg.steps:
            save_folder(model, tok, out.with_name(f"{out.name}-step{i}"), model_config)
    seconds = time.perf_counter() - t0
    if out is not None:
        save_folder(model, tok, out, model_config)
    return {"seconds": seconds, "final_loss": avg}


def _count(text: str) -> int | None:
    if text == "all":
        return None
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("give a positive count or 'all'")
    return n


def main(argv: list[str] | None = None) -> int:
    from qwen3_chat.demo.evaluate import evaluate, format_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="folder to write the trained model to")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--resume", type=Path, help="go on from this folder's weights and tokenizer")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="conversations and order")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--extra", action="store_true", help="also train on EXTRA_PHRASINGS")
    p.add_argument("--mix", action="store_true", help="also train on composed phrasings")
    p.add_argument("--save-every", type=int, default=0, help="also write OUT-stepN folders")
    p.add_argument("--eval", type=Path, help="evaluate this folder on held-out questions")
    p.add_argument("--validation", action="store_true",
                   help="evaluate on the validation questions instead (to choose checkpoints)")
    p.add_argument("-n", type=_count, default=100,
                   help="held-out questions per mode, or 'all' (%(default)s)")
    args = p.parse_args(argv)
    log = partial(print, flush=True)  # a script: printing is its job
    if not (args.out or args.eval):
        p.print_usage(sys.stderr)
        return 2
    if args.out:
        cfg = TrainConfig(seed=args.seed, steps=args.steps, lr=args.lr, extra=args.extra,
                          mix=args.mix, save_every=args.save_every)
        stats = train(cfg, args.out, log, init=args.resume)
        log(f"trained in {stats['seconds']:.0f}s, final loss {stats['final_loss']:.4f}")
    log(format_table(evaluate(args.eval or args.out, args.n, args.validation)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
