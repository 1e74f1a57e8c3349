"""Benchmark qwen3-chat against mlx-lm in one run, on the same weights.

    python bench/run.py --quick            # reduced shapes, < 5 minutes on a 2-core CPU
    python bench/run.py                    # CPU: fuller runs; GPU: real 0.6B / 4B / 30B-A3B shapes
    python bench/run.py --hybrid           # Qwen3.5-4B- / Qwen3.6-35B-A3B-like (bench/hybrid.py)

Random weights in real Qwen3 shapes (the real 151936 vocab) are built once, quantized, and
shared by both engines (the same arrays). Runs of the two engines are interleaved and
medians taken, so machine noise hits both alike. Prints a Markdown table; writes JSON + MD.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen3_chat.chat.session import ChatSession  # noqa: E402
from qwen3_chat.chat.tokenizer import Tokenizer  # noqa: E402
from qwen3_chat.engine.generate import stream_generate  # noqa: E402
from qwen3_chat.engine.sampling import SamplingParams  # noqa: E402
from qwen3_chat.models.config import ModelConfig  # noqa: E402
from qwen3_chat.models.qwen3 import Model  # noqa: E402
from qwen3_chat.weights.quantize import quantize_model  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "qwen3-tokenizer"
# Qwen3-4B's published config.json differs from the 0.6B one in these fields only.
QWEN3_4B = {
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True,
}  # fmt: skip


@dataclass
class Shape:
    name: str
    config: dict


def shapes(tok_dir: Path, gpu: bool, quick: bool) -> list[Shape]:
    dense = json.loads((tok_dir / "config.json").read_text())
    moe = json.loads((tok_dir / "Qwen3-30B-A3B" / "config.json").read_text())
    if gpu:
        return [Shape("Qwen3-0.6B", dense), Shape("Qwen3-4B", {**dense, **QWEN3_4B}),
                Shape("Qwen3-30B-A3B", moe)]  # fmt: skip
    layers = 2 if quick else 4
    return [
        Shape(f"0.6B-shape, {layers} layers", {**dense, "num_hidden_layers": layers}),
        Shape(f"30B-A3B-shape, {max(layers // 2, 1)} layers",
              {**moe, "num_hidden_layers": max(layers // 2, 1)}),
    ]  # fmt: skip


def build_models(cfg: dict, bits: int, dtype: mx.Dtype):
    """Our model with random weights, quantized, and mlx-lm's model sharing the same arrays."""
    import importlib

    mx.random.seed(0)
    ours = Model(ModelConfig.from_dict(cfg))
    ours.set_dtype(dtype)
    quantize_model(ours, bits)
    for layer in ours.layers:  # materialise layer by layer: float temporaries stay small
        mx.eval(layer.parameters())
    mx.eval(ours.parameters())
    mod = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    ref = mod.Model(mod.ModelArgs.from_dict(cfg))
    pred = getattr(ref, "quant_predicate", None)

    def predicate(path: str, m: nn.Module):
        if not hasattr(m, "to_quantized") or m.weight.shape[-1] % 64:
            return False
        return pred(path, m) if pred else True

    nn.quantize(ref, 64, bits, class_predicate=predicate)
    ref.load_weights(tree_flatten(ours.parameters()), strict=True)
    return ours, ref


def ban(ids: list[int]):
    """Keep random-weight models from stopping or switching phase, so runs are equal length."""
    banned = mx.array(ids)

    def apply(tokens, logits):
        logits[..., banned] = -mx.inf
        return logits

    return apply


def run_ours(model, tok, prompt, n, processors, **kw) -> dict:
    mx.reset_peak_memory()
    stats = None
    for ev in stream_generate(model, tok, prompt, sampling=SamplingParams(temperature=0),
                              max_tokens=n, logits_processors=processors, **kw):  # fmt: skip
        stats = getattr(ev, "stats", stats)
    return {"ttft": stats.ttft_s, "prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps,
            "tokens": stats.answer_tokens + stats.reasoning_tokens,
            "peak_gb": stats.peak_memory_gb}  # fmt: skip


def run_mlx_lm(model, hf_tok, prompt, n, processors) -> dict:
    from mlx_lm import stream_generate as ref_generate
    from mlx_lm.sample_utils import make_sampler

    mx.reset_peak_memory()
    last = None
    for r in ref_generate(model, hf_tok, prompt, max_tokens=n, sampler=make_sampler(0.0),
                          logits_processors=processors):  # fmt: skip
        last = r
    elapsed = last.generation_tokens / last.generation_tps if last.generation_tps else 0.0
    decode = (last.generation_tokens - 1) / elapsed if elapsed else 0.0
    return {"ttft": last.prompt_tokens / last.prompt_tps, "prefill_tps": last.prompt_tps,
            "decode_tps": decode, "tokens": last.generation_tokens,
            "peak_gb": mx.get_peak_memory() / 1e9}  # fmt: skip


def interleaved(reps: int, fns: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {k: [] for k in fns}
    names = list(fns)
    for name in names:  # warm-up: first calls pay for kernel compilation and allocation
        fns[name]()
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            out[name].append(fns[name]())
    return out


def both(ours, ref, tok, hf_tok, prompt, n: int, processors, reps: int) -> dict[str, list[dict]]:
    """Interleaved runs of both engines generating `n` tokens after `prompt`."""
    return interleaved(reps, {
        "ours": lambda: run_ours(ours, tok, prompt, n, processors),
        "mlx_lm": lambda: run_mlx_lm(ref, hf_tok, prompt, n, processors)})  # fmt: skip


def add_decode(row: dict, runs: dict[str, list[dict]], peak: str = "decode_peak_gb") -> None:
    """Decode medians of both engines into `row` (tokens too: equal lengths show fairness)."""
    for eng in runs:
        row[f"decode_tps_{eng}"] = med(runs[eng], "decode_tps")
        row[f"{peak}_{eng}"] = med(runs[eng], "peak_gb")
        row[f"decode_tokens_{eng}"] = runs[eng][0]["tokens"]


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def decode_matmuls(model: Model) -> list[mx.array]:
    """The quantized matmuls of one decode step, on one token, without attention or glue."""
    cfg = model.config
    dt = model.model.norm.weight.dtype
    x = mx.ones((1, 1, cfg.hidden_size), dt)
    outs = []
    for layer in model.layers:
        a, mlp = layer.self_attn, layer.mlp
        outs += [a.q_proj(x), a.k_proj(x), a.v_proj(x),
                 a.o_proj(mx.ones((1, 1, a.n_heads * a.head_dim), dt))]  # fmt: skip
        if hasattr(mlp, "switch_mlp"):
            k, sm = cfg.num_experts_per_tok, mlp.switch_mlp
            idx = mx.arange(k).reshape(1, 1, k)
            h = mx.ones((1, 1, k, 1, cfg.moe_intermediate_size), dt)
            xe = mx.expand_dims(x, (-2, -3))
            outs += [mlp.gate(x), sm.gate_proj(xe, idx), sm.up_proj(xe, idx), sm.down_proj(h, idx)]
        else:
            outs += [mlp.gate_proj(x), mlp.up_proj(x),
                     mlp.down_proj(mx.ones((1, 1, cfg.intermediate_size), dt))]  # fmt: skip
    emb = model.model.embed_tokens
    outs.append(emb.as_linear(x) if cfg.tie_word_embeddings else model.lm_head(x))
    return outs


def kernel_time(model: Model, reps: int) -> float:
    """Median seconds to run the decode step's matmuls alone: the kernels' own limit."""
    mx.eval(decode_matmuls(model))
    times = []
    for _ in range(reps):
        outs = decode_matmuls(model)  # a fresh graph each time, like a real step
        t = time.perf_counter()
        mx.eval(outs)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bytes_per_token(model: Model) -> float:
    """Weight bytes one decode step must read (only the routed experts of an MoE layer)."""
    cfg = model.config
    total = 0.0
    for name, p in tree_flatten(model.parameters()):
        if ".switch_mlp." in name:
            total += p.nbytes * cfg.num_experts_per_tok / cfg.num_experts
        elif "embed_tokens" in name and not cfg.tie_word_embeddings:
            total += p.nbytes / cfg.vocab_size  # one row is gathered
        else:
            total += p.nbytes
    return total


def memory_bandwidth() -> float:
    """Bytes/s of a large device copy (read + write), measured once."""
    a = mx.random.uniform(shape=(256 * 1024 * 1024,))
    mx.eval(a)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a + 1)
        times.append(time.perf_counter() - t)
    return 2 * a.nbytes / min(times)


LOREM = ("The quick brown fox jumps over the lazy dog while the committee reviews "
         "the quarterly figures, notes the weather, and plans a picnic by the river. ")  # fmt: skip


def multi_turn(model, tok, total_tokens: int, turns: int, reps: int) -> dict:
    """TTFT of the next turn of a long conversation: cache reuse vs a full re-prefill."""
    per = max(total_tokens // (2 * turns), 8)
    words = (LOREM * (per // 10 + 1)).split()
    history = []
    for t in range(turns):
        history += [
            {"role": "user", "content": f"Question {t}: " + " ".join(words[: per // 2])},
            {"role": "assistant", "content": f"Answer {t}: " + " ".join(words[:per])},
        ]
    greedy = SamplingParams(temperature=0)

    def session() -> ChatSession:
        return ChatSession(model, tok, thinking=False, max_tokens=1, sampling=greedy,
                           context_length=total_tokens * 4)  # fmt: skip

    def reuse() -> dict:
        s = session()
        s.load_messages(history[:-2])
        list(s.send(history[-2]["content"]))  # the earlier turn: fills the cache
        st = [e for e in s.send("And one more question?") if hasattr(e, "stats")][0].stats
        return {"ttft": st.ttft_s, "prefill_tokens": st.prefill_tokens, "prompt": st.prompt_tokens}

    def reprefill() -> dict:
        s = session()
        s.load_messages(history[:-2])
        list(s.send(history[-2]["content"]))
        fresh = session()
        fresh.load_messages(s.messages)
        st = [e for e in fresh.send("And one more question?") if hasattr(e, "stats")][0].stats
        return {"ttft": st.ttft_s, "prefill_tokens": st.prefill_tokens, "prompt": st.prompt_tokens}

    runs = interleaved(reps, {"reuse": reuse, "reprefill": reprefill})
    r, f = med(runs["reuse"], "ttft"), med(runs["reprefill"], "ttft")
    return {"prompt_tokens": runs["reprefill"][0]["prompt"],
            "reuse_prefill_tokens": runs["reuse"][0]["prefill_tokens"],
            "ttft_reuse_s": r, "ttft_reprefill_s": f, "speedup": f / r}  # fmt: skip


def bench_shape(shape: Shape, bits: int, args, tok, hf_tok, dtype) -> dict:
    ours, ref = build_models(shape.config, bits, dtype)
    stop = sorted({*tok.eos_ids, tok.think_start_id, tok.think_end_id})
    processors = [ban(stop)]
    rng = mx.random.key(1)
    row: dict = {"shape": shape.name, "bits": bits}
    for n_prompt in args.prefill:
        prompt = mx.random.randint(0, 150000, (n_prompt,), key=rng).tolist()
        runs = both(ours, ref, tok, hf_tok, prompt, 2, processors, args.reps)
        for eng in runs:
            row[f"prefill{n_prompt}_tps_{eng}"] = med(runs[eng], "prefill_tps")
            row[f"ttft{n_prompt}_s_{eng}"] = med(runs[eng], "ttft")
            row[f"peak{n_prompt}_gb_{eng}"] = med(runs[eng], "peak_gb")
    prompt = mx.random.randint(0, 150000, (32,), key=rng).tolist()
    runs = both(ours, ref, tok, hf_tok, prompt, args.decode, processors, args.reps)
    add_decode(row, runs)
    kt = kernel_time(ours, max(args.reps * 3, 5))
    row["kernel_step_ms"] = kt * 1e3
    row["decode_overhead"] = (1 / row["decode_tps_ours"]) / kt
    row["bytes_per_token"] = bytes_per_token(ours)
    if args.multi_turn:
        row["multi_turn"] = multi_turn(ours, tok, args.multi_turn, 4, max(args.reps - 1, 1))
    return row


def ratio(row: dict, key: str, lower_is_better: bool = False) -> float:
    a, b = row[f"{key}_ours"], row[f"{key}_mlx_lm"]
    return (b / a) if lower_is_better else (a / b)


def table(rows: list[dict], args, bandwidth: float | None) -> str:
    p = args.prefill
    head = ["shape", "bits"] + [f"prefill {n} tok/s (ours / mlx-lm = ratio)" for n in p] + [
        f"decode {args.decode} tok/s (ratio)", f"TTFT {p[0]} ms (ratio)",
        "peak GB (mlx-lm/ours)", "decode overhead vs bare matmuls"]  # fmt: skip
    if bandwidth:
        head.append("roofline fraction")
    if args.multi_turn:
        head.append(f"turn-N TTFT, {args.multi_turn}-token chat: reuse vs re-prefill")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["shape"], str(r["bits"])]
        for n in p:
            cells.append(f"{r[f'prefill{n}_tps_ours']:.1f} / {r[f'prefill{n}_tps_mlx_lm']:.1f}"
                         f" = **{ratio(r, f'prefill{n}_tps'):.2f}x**")  # fmt: skip
        cells.append(f"{r['decode_tps_ours']:.1f} / {r['decode_tps_mlx_lm']:.1f}"
                     f" = **{ratio(r, 'decode_tps'):.2f}x**")  # fmt: skip
        cells.append(f"{r[f'ttft{p[0]}_s_ours'] * 1e3:.0f} / {r[f'ttft{p[0]}_s_mlx_lm'] * 1e3:.0f}"
                     f" = **{ratio(r, f'ttft{p[0]}_s', True):.2f}x**")  # fmt: skip
        cells.append(f"{r['decode_peak_gb_ours']:.2f} / {r['decode_peak_gb_mlx_lm']:.2f}"
                     f" = **{ratio(r, 'decode_peak_gb', True):.2f}x**")  # fmt: skip
        cells.append(f"{r['decode_overhead']:.2f}x ({r['kernel_step_ms']:.1f} ms kernels)")
        if bandwidth:
            frac = r["bytes_per_token"] * r["decode_tps_ours"] / bandwidth
            cells.append(f"{frac:.0%}")
        if args.multi_turn:
            m = r["multi_turn"]
            cells.append(f"{m['ttft_reuse_s'] * 1e3:.0f} ms ({m['reuse_prefill_tokens']} tok) vs "
                         f"{m['ttft_reprefill_s'] * 1e3:.0f} ms ({m['prompt_tokens']} tok) = "
                         f"**{m['speedup']:.1f}x**")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes: < 5 min on 2 CPU cores")
    ap.add_argument("--hybrid", action="store_true",
                    help="Qwen3.5/3.6-like hybrid shapes instead (bench/hybrid.py, its options)")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--bits", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=None)
    if "--hybrid" in sys.argv[1:]:
        import hybrid  # bench/ is the script's folder, so first on sys.path

        sys.argv.remove("--hybrid")
        return hybrid.main()
    args = ap.parse_args()
    gpu = mx.default_device() == mx.gpu
    if not (args.tokenizer / "tokenizer.json").exists():
        sys.exit(f"bench: Qwen3 tokenizer files not found in {args.tokenizer} (--tokenizer DIR)")
    if args.quick:
        args.prefill, args.decode, args.multi_turn = [512], 64, 1024
        args.bits, args.reps = args.bits or [4], args.reps or 3
    else:
        args.prefill, args.decode, args.multi_turn = [512, 2048], 256, 4096
        args.bits, args.reps = args.bits or [4, 8], args.reps or (5 if gpu else 3)
    dtype = mx.bfloat16 if gpu else mx.float32
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    tok = Tokenizer.from_dir(args.tokenizer)
    hf_tok = TokenizerWrapper(AutoTokenizer.from_pretrained(str(args.tokenizer)))
    bandwidth = memory_bandwidth() if gpu else None
    rows = []
    for shape in shapes(args.tokenizer, gpu, args.quick):
        for bits in args.bits:
            print(f"# {shape.name}, {bits}-bit ...", file=sys.stderr, flush=True)
            rows.append(bench_shape(shape, bits, args, tok, hf_tok, dtype))
            gc.collect()
            mx.clear_cache()
    md = table(rows, args, bandwidth)
    device = f"{mx.default_device()} ({platform.machine()}, mlx {mx.__version__})"
    meta = {"device": device, "quick": args.quick, "prefill": args.prefill,
            "decode": args.decode, "reps": args.reps, "bandwidth_Bps": bandwidth}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{stamp}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (args.out / f"bench-{stamp}.md").write_text(f"Device: {device}\n\n{md}\n")
    print(f"Device: {device}; medians of {args.reps} interleaved runs\n")
    print(md)


if __name__ == "__main__":
    main()
