"""Benchmark the hybrid Qwen3 family (Gated DeltaNet + gated attention) against mlx-lm.

    python bench/run.py --hybrid           # Qwen3.5-4B-like and Qwen3.6-35B-A3B-like, 4 layers
    python bench/run.py --hybrid --narrow 2 --turn-reps 1   # half widths: ~10 min, 2 CPU cores

Each shape is a random checkpoint that transformers writes in the released HF layout
(tests/hybrid_checkpoints.py), quantized once by our loader and saved as an
MLX-community folder; both engines load that same folder (qwen3_chat.load and
mlx_lm.load). Runs are interleaved and medians taken (bench/run.py's helpers). Turn-N time
to first token compares ChatSession reusing its snapshots with a fresh session that
re-prefills the whole chat. Writes JSON + Markdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from run import (  # noqa: E402
    DEFAULT_TOKENIZER,
    add_decode,
    ban,
    both,
    med,
    multi_turn,
    ratio,
)  # fmt: skip

from qwen3_chat.weights.convert import TOKENIZER_FILES  # noqa: E402
from qwen3_chat.weights.loader import load, load_model, save_model  # noqa: E402

# Published Qwen3.5-4B / Qwen3.6-35B-A3B text configs (hidden sizes, heads, linear-attention
# heads, experts); the CPU run keeps the widths but cuts layers, experts and the vocabulary.
LINEAR = {"linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
          "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}  # fmt: skip
QWEN35_4B = {**LINEAR, "hidden_size": 2560, "intermediate_size": 9216, "num_attention_heads": 16,
             "num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True}  # fmt: skip
QWEN36_35B_A3B = {**LINEAR, "hidden_size": 2048, "num_attention_heads": 16,
                  "num_key_value_heads": 2, "head_dim": 256, "num_experts": 256,
                  "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                  "shared_expert_intermediate_size": 512, "tie_word_embeddings": False}  # fmt: skip
# 4 layers = 3 Gated DeltaNet + 1 gated attention (the released 3:1 pattern).
LAYERS = 4


# Divided by --narrow: model width and head counts (the head dims stay as released).
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size",
          "shared_expert_intermediate_size", "num_attention_heads", "num_key_value_heads",
          "linear_num_key_heads", "linear_num_value_heads")  # fmt: skip


def shapes(experts: int, vocab: int, narrow: int = 1) -> list[tuple[str, str, dict]]:
    common = {"num_hidden_layers": LAYERS, "vocab_size": vocab}
    width = f", widths / {narrow}" if narrow > 1 else ""
    out = [
        (f"Qwen3.5-4B-like, {LAYERS} layers (3 linear + 1 attn){width}", "qwen3_5",
         {**QWEN35_4B, **common}),
        (f"Qwen3.6-35B-A3B-like, {LAYERS} layers, {experts} of 256 experts (top-8){width}",
         "qwen3_5_moe", {**QWEN36_35B_A3B, **common, "num_experts": experts,
                         "intermediate_size": 512}),
    ]  # fmt: skip
    return [(n, a, {k: v // narrow if k in WIDTHS else v for k, v in c.items()})
            for n, a, c in out]  # fmt: skip


def tie_embeddings(src: Path) -> None:
    """Tie the output layer to the embedding at the top level too, as Qwen3.5-4B's folder does
    (transformers wrote an untied lm_head: its VL config's own flag defaults to False)."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    f = src / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(f)).items() if not k.endswith("lm_head.weight")}
    save_file(tensors, str(f), metadata={"format": "pt"})


def write_folder(arch: str, text: dict, tok_dir: Path, work: Path, bits: int) -> Path:
    """HF-layout float checkpoint (transformers) -> our quantized MLX-community folder."""
    from hybrid_checkpoints import make_hybrid

    src, hf = make_hybrid(arch, work / "float", tokenizer_dir=tok_dir, **text)
    del hf
    gc.collect()
    if text.get("tie_word_embeddings"):
        tie_embeddings(src)
    model = load_model(src, bits=bits, dtype=mx.float32)
    extra = [src / n for n in TOKENIZER_FILES if (src / n).exists()]
    out = save_model(model, None, work / f"q{bits}", extra_files=extra)
    del model
    for f in (src).iterdir():  # the float copy is no longer needed; free the disk early
        f.unlink()
    return out


def bench_folder(name: str, folder: Path, bits: int, args) -> dict:
    from mlx_lm import load as mlx_lm_load

    ours, tok = load(folder, dtype=mx.float32)
    ref, hf_tok = mlx_lm_load(str(folder))
    processors = [ban(sorted({*tok.eos_ids, tok.think_start_id, tok.think_end_id}))]
    rng = mx.random.key(1)
    row: dict = {"shape": name, "bits": bits}
    prompt = mx.random.randint(0, 150000, (args.prefill,), key=rng).tolist()
    runs = both(ours, ref, tok, hf_tok, prompt, 2, processors, args.reps)
    for eng in runs:
        row[f"prefill_tps_{eng}"] = med(runs[eng], "prefill_tps")
        row[f"ttft_s_{eng}"] = med(runs[eng], "ttft")
    prompt = mx.random.randint(0, 150000, (32,), key=rng).tolist()
    runs = both(ours, ref, tok, hf_tok, prompt, args.decode, processors, args.reps)
    add_decode(row, runs, "peak_gb")
    print("#   prefill/decode done, turn N ...", file=sys.stderr, flush=True)
    row["multi_turn"] = multi_turn(ours, tok, args.chat, 4, args.turn_reps)
    return row


def table(rows: list[dict], args) -> str:
    head = ["shape", "bits", f"prefill {args.prefill} tok/s (ours / mlx-lm = ratio)",
            f"TTFT {args.prefill} ms (ratio)", f"decode {args.decode} tok/s (ratio)",
            "peak GB (mlx-lm/ours)",
            f"turn-N TTFT, ~{args.chat}-token chat: snapshots vs re-prefill"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["multi_turn"]
        cells = [r["shape"], str(r["bits"]),
                 f"{r['prefill_tps_ours']:.1f} / {r['prefill_tps_mlx_lm']:.1f}"
                 f" = **{ratio(r, 'prefill_tps'):.2f}x**",
                 f"{r['ttft_s_ours'] * 1e3:.0f} / {r['ttft_s_mlx_lm'] * 1e3:.0f}"
                 f" = **{ratio(r, 'ttft_s', True):.2f}x**",
                 f"{r['decode_tps_ours']:.1f} / {r['decode_tps_mlx_lm']:.1f}"
                 f" = **{ratio(r, 'decode_tps'):.2f}x**",
                 f"{r['peak_gb_ours']:.2f} / {r['peak_gb_mlx_lm']:.2f}"
                 f" = **{ratio(r, 'peak_gb', True):.2f}x**",
                 f"{m['ttft_reuse_s'] * 1e3:.0f} ms ({m['reuse_prefill_tokens']} tok) vs "
                 f"{m['ttft_reprefill_s'] * 1e3:.0f} ms ({m['prompt_tokens']} tok) = "
                 f"**{m['speedup']:.1f}x**"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(rows: list[dict], args, vocab: int) -> str:
    """Write the JSON and Markdown of the rows so far; returns the table."""
    md = table(rows, args)
    device = f"{mx.default_device()} ({platform.machine()}, mlx {mx.__version__})"
    meta = {"device": device, "prefill": args.prefill, "decode": args.decode, "reps": args.reps,
            "turn_reps": args.turn_reps, "chat_tokens": args.chat, "vocab": vocab,
            "narrow": args.narrow, "command": " ".join(sys.argv)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (args.out / f"{args.name}.md").write_text(
        f"Device: {device}; float32 compute, medians of {args.reps} interleaved runs "
        f"(turn N: {args.turn_reps}); vocab {vocab}\n\n{md}\n")  # fmt: skip
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default=None, help="file stem (default: hybrid-<time>)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--turn-reps", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--chat", type=int, default=1024, help="tokens in the turn-N chat")
    ap.add_argument("--experts", type=int, default=32, help="routed experts in the MoE shape")
    ap.add_argument("--narrow", type=int, default=1, help="divide widths and head counts by N")
    ap.add_argument("--only", type=int, default=None, help="run only shape N (0 or 1)")
    args = ap.parse_args()
    args.name = args.name or f"hybrid-{time.strftime('%Y%m%d-%H%M%S')}"
    if not (args.tokenizer / "tokenizer.json").exists():
        sys.exit(f"bench: Qwen3 tokenizer files not found in {args.tokenizer} (--tokenizer DIR)")
    # The Qwen3 tokenizer's vocabulary (the hybrids ship 248k); its ids must fit the model.
    vocab = json.loads((args.tokenizer / "config.json").read_text())["vocab_size"]
    rows = []
    todo = shapes(args.experts, vocab, args.narrow)
    for i, (name, arch, text) in enumerate(todo):
        if args.only is not None and i != args.only:
            continue
        print(f"# {name}, {args.bits}-bit: building ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="qwen3-hybrid-bench-") as work:
            t = time.perf_counter()
            folder = write_folder(arch, text, args.tokenizer, Path(work), args.bits)
            print(f"#   built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            rows.append(bench_folder(name, folder, args.bits, args))
        gc.collect()
        mx.clear_cache()
        md = write(rows, args, vocab)  # after each shape: a stopped run keeps what it finished
    device = f"{mx.default_device()} ({platform.machine()}, mlx {mx.__version__})"
    print(f"Device: {device}; medians of {args.reps} interleaved runs\n")
    print(md)


if __name__ == "__main__":
    main()
