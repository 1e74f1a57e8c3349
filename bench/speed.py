"""Issue 10 benchmarks: the compiled decode step, turn N, and speculative decoding.

    python bench/speed.py --quick         # ~10 minutes on a 2-core CPU, all tables below
    python bench/draft_bench.py --quick   # only the draft-model table (JSON in bench/results)

- micro: a host-bound shape (Qwen3-0.6B depth, 28 layers, narrow layers, an 8k vocabulary
  so lm_head does not dominate, 4-bit): decode tok/s of our compiled step, our eager step
  and mlx-lm, interleaved in one process on the same weights; and the host time to build
  one step's graph.
- turn N: wall time from send() to the reply's first token with ~4k tokens of history in
  the cache, against a first turn with the same new message, on a 2-layer model with the
  real vocabulary (so the fixed per-turn costs, which this measures, are not hidden).
- speculation: prompt lookup against plain decoding (greedy, identical tokens), on a
  copy-heavy and a free-form prompt: acceptance, tokens per target step, wall ratio. On
  random weights the model does not copy, so those rows show the cost when drafts fail;
  the demo model (trained) shows a model whose reasoning repeats itself.
- draft model (bench/draft_bench.py): our --speculate draft against mlx-lm's --draft-model
  on the same safetensors folders (a random target and a truncated copy as its draft).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from draft_bench import parser, run_draft, write  # noqa: E402
from run import (  # noqa: E402
    LOREM,
    ban,
    build_models,
    interleaved,
    med,
    run_mlx_lm,
    run_ours,
)

from qwen3_chat.chat.session import ChatSession  # noqa: E402
from qwen3_chat.chat.tokenizer import Tokenizer  # noqa: E402
from qwen3_chat.engine.compiled import CompiledDecoder, eager_decode  # noqa: E402
from qwen3_chat.engine.events import Finished  # noqa: E402
from qwen3_chat.engine.generate import prefill, stream_generate  # noqa: E402
from qwen3_chat.engine.sampling import SamplingParams  # noqa: E402
from qwen3_chat.engine.speculative import Speculation  # noqa: E402

GREEDY = SamplingParams(temperature=0)
# Qwen3-0.6B's depth with narrow layers: the step is dominated by building its graph. The
# vocabulary is cut to 8k (ids below it are ordinary tokens, and no special id can come up).
MICRO = {"num_hidden_layers": 28, "hidden_size": 128, "intermediate_size": 384,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "vocab_size": 8192, "tie_word_embeddings": False}  # fmt: skip
# Turn N: two small layers, the real vocabulary.
TURN = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
CODE = "".join(
    f"def f{i}(x, y):\n    total = x * {i} + y\n    return total - {i}\n\n" for i in range(12)
)


def shape_config(tok_dir: Path, shape: dict) -> dict:
    import json

    return {**json.loads((tok_dir / "config.json").read_text()), **shape}


def host_ms_per_step(model, decoder, steps: int) -> float:
    """Median time to build one decode step's graph (before any compute is waited on)."""
    cache = model.make_cache()
    y = mx.argmax(prefill(model, list(range(1, 33)), cache), axis=-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        logits = decoder(model, y, cache)
        times.append(time.perf_counter() - t)
        y = mx.argmax(logits, axis=-1)
        mx.eval(y)
    return statistics.median(times[3:]) * 1e3


def bench_micro(tok, hf_tok, args) -> dict:
    ours, ref = build_models(shape_config(args.tokenizer, MICRO), 4, mx.float32)
    processors: list = []  # no stop or think id exists in an 8k vocabulary
    prompt = mx.random.randint(0, MICRO["vocab_size"], (32,), key=mx.random.key(1)).tolist()
    compiled = CompiledDecoder(ours)
    runs = interleaved(args.reps, {
        "compiled": lambda: run_ours(ours, tok, prompt, args.decode, processors, decoder=compiled),
        "eager": lambda: run_ours(ours, tok, prompt, args.decode, processors,
                                  decoder=eager_decode),
        "mlx_lm": lambda: run_mlx_lm(ref, hf_tok, prompt, args.decode, processors),
    })  # fmt: skip
    row = {k: med(v, "decode_tps") for k, v in runs.items()}
    row["host_ms_eager"] = host_ms_per_step(ours, eager_decode, 30)
    row["host_ms_compiled"] = host_ms_per_step(ours, compiled, 30)
    return row


def first_token_s(session: ChatSession, text: str) -> tuple[float, Finished]:
    """Wall time from send() to the first token (max_tokens=1: the reply is that token)."""
    t = time.perf_counter()
    done = [e for e in session.send(text) if isinstance(e, Finished)][0]
    return time.perf_counter() - t, done


def bench_turn_n(model, tok, history_tokens: int, reps: int) -> dict:
    words = LOREM.split()
    history, n = [], 0
    while n < history_tokens:
        q = f"Question {len(history) // 2}: " + " ".join(words[: 12 + len(history) % 7])
        a = f"Answer {len(history) // 2}: " + " ".join((words * 4)[: 60 + len(history) % 13])
        history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        n = len(tok.encode(tok.apply_chat_template(history)))
    question = "And what did the committee decide about the picnic by the river?"

    def session() -> ChatSession:
        return ChatSession(model, tok, thinking=False, max_tokens=1, sampling=GREEDY,
                           context_length=4 * history_tokens + 1024)  # fmt: skip

    def turn_n() -> dict:
        s = session()
        s.load_messages(history[:-2])
        list(s.send(history[-2]["content"]))  # the previous turn fills the cache
        wall, done = first_token_s(s, question)
        return {"s": wall, "prompt": done.stats.prompt_tokens,
                "prefill": done.stats.prefill_tokens}  # fmt: skip

    def first_turn() -> dict:
        wall, done = first_token_s(session(), question)
        return {"s": wall, "prompt": done.stats.prompt_tokens,
                "prefill": done.stats.prefill_tokens}  # fmt: skip

    runs = interleaved(reps, {"turn_n": turn_n, "first": first_turn})
    text = tok.apply_chat_template([*history, {"role": "user", "content": question}])
    t = time.perf_counter()
    for _ in range(5):
        tok.encode(text)
    full_encode = (time.perf_counter() - t) / 5
    return {"turn_n_s": med(runs["turn_n"], "s"), "first_s": med(runs["first"], "s"),
            "history": runs["turn_n"][0]["prompt"], "new": runs["turn_n"][0]["prefill"],
            "first_prompt": runs["first"][0]["prompt"], "full_encode_s": full_encode}  # fmt: skip


def bench_speculation(model, tok, name: str, prompt: str, n: int, reps: int, **kw) -> dict:
    ids = tok.encode(prompt)
    spec = Speculation()

    def run(speculation) -> dict:
        t = time.perf_counter()
        done = [e for e in stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=n,
                                           speculation=speculation, **kw)
                if isinstance(e, Finished)][0]  # fmt: skip
        return {"s": time.perf_counter() - t, "ids": done.token_ids}

    runs = interleaved(reps, {"plain": lambda: run(None), "lookup": lambda: run(spec)})
    s = spec.stats
    return {"name": name, "tokens": len(runs["plain"][0]["ids"]),
            "identical": runs["plain"][0]["ids"] == runs["lookup"][0]["ids"],
            "acceptance": s.accepted / s.drafted if s.drafted else 0.0,
            "drafted": s.drafted, "tokens_per_step": s.tokens_per_step,
            "speedup": med(runs["plain"], "s") / med(runs["lookup"], "s")}  # fmt: skip


def tables(micro: dict, turn: dict, spec: list[dict], decode: int) -> str:
    c, e, r = micro["compiled"], micro["eager"], micro["mlx_lm"]
    hc, he = micro["host_ms_compiled"], micro["host_ms_eager"]
    lines = [
        "| micro shape (28 layers, hidden 128, 8k vocab, 4-bit) | tok/s | ratio vs mlx-lm | "
        "host ms/step |",
        "|---|---|---|---|",
        f"| ours, compiled step | {c:.1f} | **{c / r:.2f}x** | {hc:.2f} |",
        f"| ours, eager step | {e:.1f} | {e / r:.2f}x | {he:.2f} |",
        f"| mlx-lm | {r:.1f} | 1.00x | |",
        "",
        f"Decode {decode} tokens; host time per step {hc / he - 1:+.0%} compiled vs eager.",
        "",
        "| turn N | send → first token | prompt tokens | prefilled |",
        "|---|---|---|---|",
        f"| turn N, {turn['history']}-token chat | {turn['turn_n_s'] * 1e3:.1f} ms | "
        f"{turn['history']} | {turn['new']} |",
        f"| first turn, same message | {turn['first_s'] * 1e3:.1f} ms | "
        f"{turn['first_prompt']} | {turn['first_prompt']} |",
        "",
        f"Turn N / first turn = **{turn['turn_n_s'] / turn['first_s']:.2f}x** (target <= 1.5x); "
        f"re-encoding the whole chat, as before, alone took {turn['full_encode_s'] * 1e3:.1f} ms.",
        "",
        "| speculation (prompt lookup, greedy) | tokens | identical | acceptance | "
        "tokens / target step | wall ratio vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for s in spec:
        lines.append(f"| {s['name']} | {s['tokens']} | {s['identical']} | {s['acceptance']:.0%} "
                     f"({s['drafted']} drafted) | {s['tokens_per_step']:.2f} | "
                     f"**{s['speedup']:.2f}x** |")  # fmt: skip
    return "\n".join(lines)


def run_all(args) -> str:
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    from qwen3_chat import load
    from qwen3_chat.demo import DEMO_MODEL_DIR

    tok = Tokenizer.from_dir(args.tokenizer)
    hf_tok = TokenizerWrapper(AutoTokenizer.from_pretrained(str(args.tokenizer)))
    print("# micro decode ...", file=sys.stderr, flush=True)
    micro = bench_micro(tok, hf_tok, args)
    print("# turn N ...", file=sys.stderr, flush=True)
    model, _ = build_models(shape_config(args.tokenizer, TURN), 4, mx.float32)
    turn = bench_turn_n(model, tok, args.history, args.reps)
    print("# speculation ...", file=sys.stderr, flush=True)
    copy = f"<|im_start|>user\nRepeat this code:\n{CODE}<|im_end|>\n<|im_start|>assistant\n"
    free = "<|im_start|>user\nWrite a short story about a fox.<|im_end|>\n<|im_start|>assistant\n"
    stop = [ban(sorted({*tok.eos_ids, tok.think_start_id, tok.think_end_id}))]
    spec = [bench_speculation(model, tok, "2-layer random weights, copy-heavy", copy,
                              args.decode, args.reps, logits_processors=stop),
            bench_speculation(model, tok, "2-layer random weights, free-form", free,
                              args.decode, args.reps, logits_processors=stop)]  # fmt: skip
    demo, demo_tok = load(DEMO_MODEL_DIR)
    ask = demo_tok.apply_chat_template([{"role": "user", "content": "What is 27 + 45?"}])
    spec.append(bench_speculation(demo, demo_tok, "demo model (trained), thinking", ask,
                                  args.decode, args.reps))  # fmt: skip
    draft = write(run_draft(args.tokenizer, args.decode, args.reps), args.out, args.reps,
                  args.decode)  # fmt: skip
    return tables(micro, turn, spec, args.decode) + "\n\n" + draft


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--history", type=int, default=4096, help="turn N: tokens of history")


def main() -> None:
    ap = parser(__doc__)
    add_arguments(ap)
    args = ap.parse_args()
    args.reps = args.reps or (3 if args.quick else 5)
    args.decode = args.decode or (64 if args.quick else 128)
    print(f"Device: {mx.default_device()} (mlx {mx.__version__}); medians of {args.reps} "
          "interleaved runs\n")  # fmt: skip
    print(run_all(args))


if __name__ == "__main__":
    main()
