"""Train the tiny offline demo model (deterministic, MLX on the CPU, float32).

Regenerate the committed folder with (two stages, ~20 minutes on 2 busy cores):

    python -m qwen3_chat.demo.train --out /tmp/demo-stage1
    python -m qwen3_chat.demo.train --resume /tmp/demo-stage1 --out qwen3_chat/demo/model \
        --steps 600 --order-seed 2 --lr 2e-3

Evaluate a folder on held-out sums (greedy) with:

    python -m qwen3_chat.demo.train --eval qwen3_chat/demo/model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from qwen3_chat.demo import data
from qwen3_chat.models.config import ModelConfig
from qwen3_chat.models.qwen3 import Model

MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 96,
    "intermediate_size": 256,
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
    order_seed: int = 1  # data order; a resumed stage uses another one
    examples: int = 12000
    vocab_size: int = 512
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    pad_to: int = 16  # pad lengths to a multiple of this so the compiled step rarely retraces
    bucket: int = 64  # batches per length-sorted chunk: little padding, still shuffled


def batches(encoded: list[tuple[list[int], list[int]]], cfg: TrainConfig, pad_id: int):
    """Endless deterministic batches: seeded shuffle, then similar lengths batched together.

    The CPU is the bottleneck, so padding is wasted compute: each chunk of `bucket`
    batches is sorted by length before batching, and the batch order is shuffled again.
    """
    rng = random.Random(cfg.order_seed)
    order = list(range(len(encoded)))
    chunk = cfg.batch_size * cfg.bucket
    while True:
        rng.shuffle(order)
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: len(encoded[i][0]))
            groups = [
                part[s : s + cfg.batch_size]
                for s in range(0, len(part) - cfg.batch_size + 1, cfg.batch_size)
            ]
            rng.shuffle(groups)
            for g in groups:
                rows = [encoded[i] for i in g]
                n = max(len(ids) for ids, _ in rows)
                n = -(-n // cfg.pad_to) * cfg.pad_to
                ids = [r[0] + [pad_id] * (n - len(r[0])) for r in rows]
                mask = [r[1] + [0] * (n - len(r[1])) for r in rows]
                yield mx.array(ids, dtype=mx.int32), mx.array(mask, dtype=mx.float32)


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
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    data.write_tokenizer(tok, tmp)
    gen = {
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
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
    """Train from scratch; write the folder to `out` (unless None). Returns time and loss."""
    model_config = {**MODEL_CONFIG, **(model_config or {})}
    mx.set_default_device(mx.cpu)  # deterministic and float32: the CPU path
    mx.random.seed(cfg.seed)
    examples = data.generate(cfg.examples, cfg.seed)
    tok = data.train_tokenizer(examples, cfg.vocab_size)
    chat = data.chat_tokenizer(tok)
    encoded = [data.encode_example(chat, ex) for ex in examples]
    model = Model(ModelConfig.from_dict({**model_config, "vocab_size": tok.get_vocab_size()}))
    if init is not None:  # a second stage: continue from a saved folder's weights
        from qwen3_chat.weights.loader import load_model

        model.update(load_model(init, dtype=mx.float32).parameters())
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"{len(examples)} examples, {sum(len(e[0]) for e in encoded)} tokens, "
        f"vocab {tok.get_vocab_size()}, {n_params} parameters")  # fmt: skip

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

    pad = tok.token_to_id("<|endoftext|>")
    t0, avg = time.perf_counter(), math.nan
    stream = batches(encoded, cfg, pad)
    for i in range(1, cfg.steps + 1):
        ids, mask = next(stream)
        loss = step(ids, mask)
        mx.eval(state, loss)
        avg = loss.item() if math.isnan(avg) else 0.95 * avg + 0.05 * loss.item()
        if i % 25 == 0 or i == cfg.steps:
            log(f"step {i}/{cfg.steps} loss {loss.item():.4f} avg {avg:.4f} "
                f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
    seconds = time.perf_counter() - t0
    if out is not None:
        save_folder(model, tok, out, model_config)
    return {"seconds": seconds, "final_loss": avg}


def held_out_sums(n: int, seed: int = 1234) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if data.is_held_out(a, b):
            pairs.append((a, b))
    return pairs


def reply(model, tokenizer, text: str, thinking: bool, max_tokens: int = 200) -> str:
    """Greedy reply as the raw generated text (with <think> and <|im_end|>)."""
    from qwen3_chat.engine.events import Finished
    from qwen3_chat.engine.generate import stream_generate
    from qwen3_chat.engine.sampling import SamplingParams

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], enable_thinking=thinking
    )
    ids = tokenizer.encode(prompt)
    for ev in stream_generate(
        model, tokenizer, ids, sampling=SamplingParams(temperature=0), max_tokens=max_tokens
    ):
        if isinstance(ev, Finished):
            return tokenizer.decode(ev.token_ids)
    raise RuntimeError("stream_generate ended without Finished")


def evaluate(path: Path, n: int = 50, log=print) -> dict[str, float]:
    from qwen3_chat.weights.loader import load

    model, tokenizer = load(path)
    result = {}
    for thinking in (True, False):
        right = 0
        for a, b in held_out_sums(n):
            out = reply(model, tokenizer, f"What is {a} + {b}?", thinking)
            answer = out.split("</think>")[-1]
            right += f"**{a + b}**" in answer
        result["thinking" if thinking else "non_thinking"] = right / n
        log(f"held-out sums, thinking={thinking}: {right}/{n}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="folder to write the trained model to")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--resume", type=Path, help="start from this folder's weights")
    p.add_argument("--order-seed", type=int, default=TrainConfig.order_seed)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--eval", type=Path, help="evaluate this folder on held-out sums")
    args = p.parse_args(argv)
    log = partial(print, flush=True)  # a script: printing is its job
    if args.out:
        cfg = TrainConfig(steps=args.steps, order_seed=args.order_seed, lr=args.lr)
        stats = train(cfg, args.out, log, init=args.resume)
        log(f"trained in {stats['seconds']:.0f}s, final loss {stats['final_loss']:.4f}")
    if args.eval or args.out:
        evaluate(args.eval or args.out, log=log)
    if not (args.out or args.eval):
        p.print_usage(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
