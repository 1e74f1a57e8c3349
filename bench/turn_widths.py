"""Turn N at real layer widths: what 4k tokens of history cost a turn's new tokens.

    python bench/turn_widths.py            # ~2 minutes on a 2-core CPU
    python bench/turn_widths.py --history 8192 --reps 7

bench/speed.py times turn N end to end on a 2-layer model 64 wide, where attention over
the history dwarfs everything else. A real model's turn N is the same forward of the new
tokens through layers hundreds of times wider, so this times that forward at Qwen3-0.6B,
4B and 8B widths: the new tokens through two layers with an empty cache (a first turn)
against the same tokens with `--history` tokens already cached (turn N), interleaved. The
ratio per layer is the model's ratio (every layer is alike; the session's own per-turn
work, ~2-3 ms, is left out). The cache is filled with random keys and values (their values
do not change the work) and the vocabulary is cut to 8k so one lm_head row does not hide
the layers. Random float32 weights; on a CPU, MLX's attention kernels are weak (reference
BLAS, a slow softmax), so this is the pessimistic side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import interleaved, med  # noqa: E402

from qwen3_chat.models import build_model, config_from_dict  # noqa: E402

# Layer widths of released Qwen3 dense models (config.json): hidden, MLP, heads, KV heads.
SHAPES = {
    "Qwen3-0.6B": (1024, 3072, 16, 8),
    "Qwen3-4B": (2560, 9728, 32, 8),
    "Qwen3-8B": (4096, 12288, 32, 8),
}
NEW_TOKENS = 28  # a short question with its template, as in bench/speed.py's turn N


def model_of(hidden: int, mlp: int, heads: int, kv: int):
    cfg = config_from_dict({
        "model_type": "qwen3", "num_hidden_layers": 2, "vocab_size": 8192,
        "hidden_size": hidden, "intermediate_size": mlp, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": 128, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960, "rope_theta": 1e6, "tie_word_embeddings": True,
    })  # fmt: skip
    model = build_model(cfg)
    mx.eval(model.parameters())
    return model


def bench_shape(model, history: int, reps: int) -> dict:
    cfg = model.config
    cached = model.make_cache()
    for c in cached:  # `history` tokens already in the cache, as after earlier turns
        kv = mx.random.normal((1, cfg.num_key_value_heads, history, cfg.head_dim))
        c.update_and_fetch(kv, kv)
    mx.eval([c.state for c in cached])
    new = mx.arange(100, 100 + NEW_TOKENS, dtype=mx.int32)[None]

    def timed(cache) -> dict:
        start = time.perf_counter()
        mx.eval(model(new, cache=cache, last_only=True))
        return {"ms": (time.perf_counter() - start) * 1e3}

    def turn_n() -> dict:
        out = timed(cached)
        for c in cached:
            c.trim(NEW_TOKENS)
        return out

    runs = interleaved(reps, {"first": lambda: timed(model.make_cache()), "turn_n": turn_n})
    first, turn = med(runs["first"], "ms"), med(runs["turn_n"], "ms")
    return {"first_ms": first, "turn_n_ms": turn, "ratio": turn / first}


def table(rows: list[dict], history: int) -> str:
    lines = [f"| layer widths | first turn, {NEW_TOKENS} tokens (ms, 2 layers) | turn N, same "
             f"tokens after {history} (ms) | ratio (target <= 1.5) |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['shape']} | {r['first_ms']:.0f} | {r['turn_n_ms']:.0f} | "
                     f"**{r['ratio']:.2f}x** |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    rows = []
    for name, shape in SHAPES.items():
        print(f"# {name} ...", file=sys.stderr, flush=True)
        rows.append({"shape": name, **bench_shape(model_of(*shape), args.history, args.reps)})
    text = table(rows, args.history)
    print(f"Device: {mx.default_device()} (mlx {mx.__version__}); float32, medians of "
          f"{args.reps} interleaved runs\n")  # fmt: skip
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(mx.default_device()), "mlx": mx.__version__, "reps": args.reps,
            "history": args.history, "new_tokens": NEW_TOKENS}  # fmt: skip
    (args.out / "turn_widths.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (args.out / "turn_widths.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
