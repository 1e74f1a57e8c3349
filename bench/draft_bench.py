"""Issue 10: draft-model speculation, ours against mlx-lm's `--draft-model`, same weights.

    python bench/draft_bench.py --quick    # a few minutes on a 2-core CPU
    python bench/speed.py --quick          # runs this table after speed.py's own

A target with random weights and the real 151,936-token Qwen3 vocabulary, and a draft that
is a truncated copy of it (the same embedding, final norm and first layers), so the draft is
partly right: acceptance is neither 0 nor 100%. Both are written as safetensors folders and
loaded from disk by our loader and by mlx-lm (float32). Greedy, on a copy-heavy and a
free-form prompt: plain decoding and draft speculation of each engine, interleaved, medians.
Tok/s is tokens over the whole call's wall time (prefill included, the same for all rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import DEFAULT_TOKENIZER, ban, interleaved, med  # noqa: E402

from qwen3_chat.engine.events import Finished  # noqa: E402
from qwen3_chat.engine.generate import stream_generate  # noqa: E402
from qwen3_chat.engine.sampling import SamplingParams  # noqa: E402
from qwen3_chat.engine.speculative import Speculation  # noqa: E402

GREEDY = SamplingParams(temperature=0)
# Deep enough that a 2-layer draft is cheaper than the target, narrow enough for 2 CPU cores.
TARGET = {"num_hidden_layers": 8, "hidden_size": 512, "intermediate_size": 1536,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
          "tie_word_embeddings": True}  # fmt: skip
DRAFT_LAYERS = 2
# Scales the later layers' output projections: large enough that the truncated draft is
# sometimes wrong, small enough that it is often right (random layers otherwise decide alone).
LATE_SCALE = 0.5
# mlx_lm.generate's --num-draft-tokens default; ours adapts 1-10, starting at 4.
MLX_LM_K = (3, 4)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "generation_config.json")  # fmt: skip
CODE = "".join(
    f"def f{i}(x, y):\n    total = x * {i} + y\n    return total - {i}\n\n" for i in range(8)
)
PROMPTS = {
    "copy-heavy": f"<|im_start|>user\nRepeat this code:\n{CODE}<|im_end|>\n<|im_start|>assistant\n",
    "free-form": "<|im_start|>user\nWrite a short story about a fox.<|im_end|>\n"
    "<|im_start|>assistant\n",
}


def write_folder(path: Path, cfg: dict, weights: dict, tok_dir: Path) -> Path:
    """A model folder as on disk: config.json, model.safetensors, the tokenizer linked in."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    for name in TOKENIZER_FILES:  # linked, never copied: the tokenizer stays in shared/
        if (tok_dir / name).exists():
            (path / name).symlink_to(tok_dir / name)
    return path


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (None for the embedding and final norm)."""
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def make_pair(root: Path, tok_dir: Path) -> tuple[Path, Path]:
    """Target and draft folders; the draft's tensors are the target's, cut after its layers."""
    from qwen3_chat.models.config import ModelConfig
    from qwen3_chat.models.qwen3 import Model

    cfg = {**json.loads((tok_dir / "config.json").read_text()), **TARGET}
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    for name in weights:
        layer = layer_index(name)
        if (
            layer is not None
            and layer >= DRAFT_LAYERS
            and name.endswith(("o_proj.weight", "down_proj.weight"))
        ):
            weights[name] = weights[name] * LATE_SCALE
    mx.eval(weights)
    target = write_folder(root / "target", cfg, weights, tok_dir)
    keep = {k: v for k, v in weights.items() if (layer_index(k) or 0) < DRAFT_LAYERS}
    draft_cfg = {**cfg, "num_hidden_layers": DRAFT_LAYERS}
    draft = write_folder(root / "draft", draft_cfg, keep, tok_dir)
    return target, draft


def ours_run(model, tok, ids: list[int], n: int, processors, spec: Speculation | None) -> dict:
    t = time.perf_counter()
    done = [e for e in stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=n,
                                       speculation=spec, logits_processors=processors)
            if isinstance(e, Finished)][0]  # fmt: skip
    s = time.perf_counter() - t
    out = {"s": s, "ids": list(done.token_ids), "tps": len(done.token_ids) / s}
    if spec is not None:
        st = spec.stats
        out.update(drafted=st.drafted, accepted=st.accepted, per_step=st.tokens_per_step)
    return out


def mlx_lm_run(model, hf_tok, ids: list[int], n: int, processors, draft=None, k=0) -> dict:
    from mlx_lm import stream_generate as ref_generate
    from mlx_lm.sample_utils import make_sampler

    kw = {"draft_model": draft, "num_draft_tokens": k} if draft is not None else {}
    t = time.perf_counter()
    out, from_draft = [], 0
    for r in ref_generate(model, hf_tok, ids, max_tokens=n, sampler=make_sampler(0.0),
                          logits_processors=processors, **kw):  # fmt: skip
        out.append(r.token)
        from_draft += bool(r.from_draft)
    s = time.perf_counter() - t
    row = {"s": s, "ids": out, "tps": len(out) / s}
    if draft is not None:
        # mlx-lm does not say how many it drafted: each verifying step emits its accepted
        # drafts plus one token of its own and drafts k (fewer only near max_tokens).
        steps = len(out) - from_draft
        row.update(drafted=steps * k, accepted=from_draft, per_step=len(out) / steps,
                   approx=True)  # fmt: skip
    return row


def bench_prompt(models: dict, name: str, ids: list[int], n: int, reps: int) -> list[dict]:
    ours, draft, tok, ref, ref_draft, hf_tok = (models[k] for k in
                                                ("ours", "draft", "tok", "ref", "ref_draft",
                                                 "hf_tok"))  # fmt: skip
    stop = [ban(sorted({*tok.eos_ids, tok.think_start_id, tok.think_end_id}))]
    spec = Speculation("draft")
    spec.use_draft(draft, tok, ours, tok)
    fns = {
        "ours plain": lambda: ours_run(ours, tok, ids, n, stop, None),
        "ours draft": lambda: ours_run(ours, tok, ids, n, stop, spec),
        "mlx-lm plain": lambda: mlx_lm_run(ref, hf_tok, ids, n, stop),
    }
    for k in MLX_LM_K:
        fns[f"mlx-lm draft k={k}"] = lambda k=k: mlx_lm_run(ref, hf_tok, ids, n, stop,
                                                            ref_draft, k)  # fmt: skip
    runs = interleaved(reps, fns)
    rows = []
    for label, rs in runs.items():
        plain = runs["ours plain" if label.startswith("ours") else "mlx-lm plain"]
        row = {"prompt": name, "row": label, "tokens": len(rs[0]["ids"]),
               "identical": rs[0]["ids"] == plain[0]["ids"], "tps": med(rs, "tps"),
               "vs_plain": med(rs, "tps") / med(plain, "tps")}  # fmt: skip
        for key in ("drafted", "accepted", "per_step", "approx"):
            if key in rs[-1]:
                row[key] = rs[-1][key]
        rows.append(row)
    ours_draft = next(r for r in rows if r["row"] == "ours draft")
    for r in rows:
        if r["row"].startswith("mlx-lm draft"):
            r["ours_over_this"] = ours_draft["tps"] / r["tps"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| prompt | row | tokens | identical to own plain | acceptance | tokens / target step "
        "| tok/s | vs own plain | ours-draft / this |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = per = "n/a"
        if "drafted" in r:
            mark = "≈" if r.get("approx") else ""
            frac = r["accepted"] / r["drafted"] if r["drafted"] else 0.0
            acc = f"{mark}{frac:.0%} ({r['accepted']}/{mark}{r['drafted']})"
            per = f"{r['per_step']:.2f}"
        cmp = f"**{r['ours_over_this']:.2f}x**" if "ours_over_this" in r else ""
        lines.append(f"| {r['prompt']} | {r['row']} | {r['tokens']} | {r['identical']} | {acc} "
                     f"| {per} | {r['tps']:.1f} | {r['vs_plain']:.2f}x | {cmp} |")  # fmt: skip
    return "\n".join(lines)


def run_draft(tok_dir: Path, n: int, reps: int) -> list[dict]:
    from mlx_lm import load as ref_load

    from qwen3_chat import load

    with tempfile.TemporaryDirectory(prefix="draft-bench-") as tmp:
        target, draft = make_pair(Path(tmp), tok_dir)
        ours, tok = load(target, dtype="float32")
        ours_draft, _ = load(draft, dtype="float32")
        ref, hf_tok = ref_load(str(target))
        ref_draft, _ = ref_load(str(draft))
    models = {"ours": ours, "draft": ours_draft, "tok": tok, "ref": ref,
              "ref_draft": ref_draft, "hf_tok": hf_tok}  # fmt: skip
    rows = []
    for name, text in PROMPTS.items():
        print(f"# draft speculation, {name} ...", file=sys.stderr, flush=True)
        rows += bench_prompt(models, name, tok.encode(text), n, reps)
    return rows


def write(rows: list[dict], out: Path, reps: int, n: int) -> str:
    """Writes bench/results/draft.json and .md; returns the table."""
    meta = {"device": str(mx.default_device()), "mlx": mx.__version__, "reps": reps,
            "decode": n, "target": TARGET, "draft_layers": DRAFT_LAYERS,
            "late_scale": LATE_SCALE}  # fmt: skip
    text = table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (out / "draft.md").write_text(text + "\n")
    return text


def parser(doc: str) -> argparse.ArgumentParser:
    """The options this script and bench/speed.py share."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--decode", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap


def main() -> None:
    args = parser(__doc__).parse_args()
    reps = args.reps or 3
    n = args.decode or (48 if args.quick else 128)
    rows = run_draft(args.tokenizer, n, reps)
    print(f"Device: {mx.default_device()} (mlx {mx.__version__}); medians of {reps} "
          "interleaved runs\n")  # fmt: skip
    print(write(rows, args.out, reps, n))


if __name__ == "__main__":
    main()
