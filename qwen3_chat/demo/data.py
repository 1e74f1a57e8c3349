"""Synthetic conversations, tokenizer and chat template for the tiny demo model.

Everything here is deterministic for a given seed: the same seed gives the same
conversations, the same BPE vocabulary and the same token ids, so
`python -m qwen3_chat.demo.train` reproduces the committed folder.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

# Qwen3's special tokens; <think>/</think> are added but not "special" (Qwen3 marks them
# special=False so decoding with skip_special_tokens keeps them).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
# Qwen2/3's pre-tokenizer split: digits one by one (which makes arithmetic learnable).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Our own Jinja template producing the Qwen3 chat format. Earlier assistant turns are
# rendered without their reasoning (as Qwen3 does); enable_thinking=false pre-fills the
# empty think block so the model answers directly.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if not reasoning and '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- content.lstrip('\\n') + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a patient math tutor.",
    "You are a tiny demo model. Keep answers short.",
)
NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ben", "Yuki")
THINGS = ("apples", "books", "coins", "cards", "marbles", "pens", "stickers", "shells")
WORDS = (
    "cat", "house", "banana", "river", "planet", "apple", "garden", "music",
    "window", "orange", "tree", "bottle", "pencil", "rocket", "yellow", "dog",
)  # fmt: skip


@dataclass
class Example:
    """One conversation. The last assistant turn is the one trained on."""

    messages: list[dict[str, Any]]
    thinking: bool  # the enable_thinking flag the prompt is rendered with
    tags: list[str] = field(default_factory=list)


def is_held_out(a: int, b: int) -> bool:
    """Sums reserved for evaluation: never used as a + b in training."""
    return (a * 7 + b * 13) % 17 == 0


def _digits_trace(a: int, b: int) -> str:
    """Column addition, ones first, stating each digit and carry."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    places = ("ones", "tens", "hundreds", "thousands")
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        step = f"{places[i]}: {terms} = {s}"
        carry = s // 10
        steps.append(step + (f", write {s % 10}, carry {carry}." if carry else "."))
    if carry:
        steps.append(f"The carry {carry} goes in front.")
    return " ".join(steps)


def _sum_pair(rng: random.Random) -> tuple[int, int]:
    while True:
        a = rng.randint(0, 99) if rng.random() < 0.85 else rng.randint(100, 999)
        b = rng.randint(0, 99)
        if not is_held_out(a, b):
            return a, b


def addition_reasoning(a: int, b: int) -> str:
    return f"I need to add {a} and {b}. {_digits_trace(a, b)} So {a} + {b} = {a + b}."


def _q_addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = _sum_pair(rng)
    q = rng.choice(
        (
            "What is {a} + {b}?",
            "Compute {a} + {b}",
            "What is {a} plus {b}?",
            "Add {a} and {b}.",
            "{a} + {b} = ?",
            "Can you add {a} and {b} for me?",
        )
    ).format(a=a, b=b)
    return q, addition_reasoning(a, b), f"{a} + {b} = **{a + b}**."


def _q_word_problem(rng: random.Random) -> tuple[str, str, str]:
    a, b = _sum_pair(rng)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    q = rng.choice(
        (
            "{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
            "There are {a} {t} in a box and {n} puts in {b} more. How many {t} are in the box?",
        )
    ).format(n=name, a=a, b=b, t=thing)
    r = f"{name} starts with {a} {thing} and adds {b}, so I add. " + addition_reasoning(a, b)
    return (
        q,
        r,
        f"{name} has **{a + b}** {thing}."
        if "box" not in q
        else (f"There are **{a + b}** {thing} in the box."),
    )


def _q_multiply(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = rng.choice(("What is {a} * {b}?", "Compute {a} * {b}", "What is {a} times {b}?"))
    r = f"I need to multiply {a} by {b}. {a} * {b} = {a * b}."
    return q.format(a=a, b=b), r, f"{a} * {b} = **{a * b}**."


def _q_subtract(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(10, 40)
    b = rng.randint(1, 9)
    q = rng.choice(("What is {a} - {b}?", "Compute {a} - {b}", "Subtract {b} from {a}."))
    r = f"I need to subtract {b} from {a}. Counting down {b} from {a} gives {a - b}."
    return q.format(a=a, b=b), r, f"{a} - {b} = **{a - b}**."


def _q_letters(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    q = rng.choice(("How many letters are in the word {w}?", "Count the letters in {w}."))
    r = f"Let me spell it: {'-'.join(w)}. That is {len(w)} letters."
    return q.format(w=w), r, f"The word {w} has **{len(w)}** letters."


def _q_chain(rng: random.Random) -> tuple[str, str, str]:
    """Multi-step sums: long reasoning, so a thinking budget visibly cuts it short."""
    nums = [rng.randint(1, 60) for _ in range(rng.randint(3, 4))]
    q = "What is " + " + ".join(map(str, nums)) + "?"
    parts, total = ["I will add the numbers one at a time."], nums[0]
    for n in nums[1:]:
        parts.append(f"Step: {total} + {n}. {_digits_trace(total, n)} So {total} + {n} = "
                     f"{total + n}.")  # fmt: skip
        total += n
    parts.append(f"The total is {total}.")
    return q, " ".join(parts), " + ".join(map(str, nums)) + f" = **{total}**."


def _q_chat(rng: random.Random) -> tuple[str, str, str]:
    q, r, a = rng.choice(
        (
            ("Hello!", "The user greets me. I should greet back and offer help.",
             "Hello! I am a tiny demo model. Ask me a small sum, like 12 + 30."),
            ("Who are you?", "The user asks who I am. I am a tiny demo model.",
             "I am a tiny demo model trained for this app. I can do small arithmetic."),
            ("Thanks!", "The user thanks me. I should reply politely.",
             "You are welcome!"),
            ("What can you do?", "The user asks what I can do. I know small arithmetic.",
             "I can add numbers, multiply small numbers and count letters."),
        )
    )  # fmt: skip
    return q, r, a


TASKS = (
    (_q_addition, 0.46),
    (_q_word_problem, 0.12),
    (_q_multiply, 0.12),
    (_q_subtract, 0.06),
    (_q_letters, 0.10),
    (_q_chain, 0.06),
    (_q_chat, 0.08),
)


def _task(rng: random.Random) -> tuple[str, str, str]:
    x, acc = rng.random(), 0.0
    for fn, p in TASKS:
        acc += p
        if x < acc:
            return fn(rng)
    return TASKS[0][0](rng)


def make_example(rng: random.Random) -> Example:
    messages: list[dict[str, Any]] = []
    tags: list[str] = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        tags.append("system")
    if rng.random() < 0.2:  # an earlier exchange, rendered without its reasoning
        q, _r, a = _task(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        tags.append("multi")
    q, r, a = _task(rng)
    thinking = rng.random() >= 0.3
    think = thinking
    x = rng.random()
    if x < 0.08:  # soft switches: the model must follow them on its own
        q, think = q + " /no_think", False
        thinking = True
        tags.append("no_think")
    elif x < 0.14:
        q, think = q + " /think", True
        thinking = True
        tags.append("think")
    messages.append({"role": "user", "content": q})
    messages.append({"role": "assistant", "content": a, "reasoning_content": r if think else ""})
    return Example(messages, thinking, tags)


def generate(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def corpus_text(examples: list[Example]) -> Iterator[str]:
    for ex in examples:
        for m in ex.messages:
            yield m["content"]
            if m.get("reasoning_content"):
                yield m["reasoning_content"]


def train_tokenizer(examples: list[Example], vocab_size: int = 512) -> HFTokenizer:
    """Byte-level BPE (any text encodes) with Qwen3's special tokens appended."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(examples), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    return tok


def tokenizer_config(tok: HFTokenizer) -> dict[str, Any]:
    """tokenizer_config.json in the shape Qwen3 ships (added tokens, template, eos/pad)."""
    added = {}
    for t in (*SPECIAL_TOKENS, *THINK_TOKENS):
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t in SPECIAL_TOKENS,
        }  # fmt: skip
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(tok: HFTokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2))


def chat_tokenizer(tok: HFTokenizer):
    """Our runtime Tokenizer for a freshly trained backend, via its public from_dir.

    Going through the written files means training sees exactly what users load.
    """
    import tempfile

    from qwen3_chat.chat.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(tok, Path(tmp))
        return Tokenizer.from_dir(tmp)


def encode_example(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask selecting the trained reply.

    The reply is whatever follows the generation prompt, up to and including <|im_end|>,
    so for soft-switch /no_think turns the model learns to write the empty block itself.
    """
    prompt = tokenizer.apply_chat_template(
        ex.messages[:-1], add_generation_prompt=True, enable_thinking=ex.thinking
    )
    full = tokenizer.apply_chat_template(ex.messages, add_generation_prompt=False)
    full = full.removesuffix("\n")  # the newline after <|im_end|> is never generated
    if not full.startswith(prompt):
        raise ValueError(f"template mismatch for {ex.messages[-2]['content']!r}")
    ids_p, ids = tokenizer.encode(prompt), tokenizer.encode(full)
    if ids[: len(ids_p)] != ids_p:
        raise ValueError(f"prompt tokens are not a prefix for {ex.messages[-2]['content']!r}")
    return ids, [0] * len(ids_p) + [1] * (len(ids) - len(ids_p))
