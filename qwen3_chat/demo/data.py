"""Synthetic conversations, tokenizer and chat template for the tiny demo model.

The demo model does one thing: add two whole numbers under 100, asked in many ways, with
reasoning that names the operands and adds column by column; anything else gets a short,
polite "I am a tiny demo model" reply. Everything is deterministic for a given seed (the same
conversations, BPE vocabulary and token ids), so `python -m qwen3_chat.demo.train`
reproduces the committed folder. Evaluation questions are disjoint from training by
construction: held-out operand pairs never appear in training, and held-out phrasings are
never used to ask a training question.
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

LIMIT = 100  # operands are whole numbers below this
# Ways to ask for a + b. {a} is always the first number named, so the reasoning can name
# the operands in the order the user gave them.
TRAIN_PHRASINGS = (
    "What is {a} + {b}?", "What is {a}+{b}?", "what is {a} plus {b}", "What is {a} plus {b}?",
    "{a} + {b}", "{a}+{b}", "{a} + {b} = ?", "{a}+{b}=?", "{a} plus {b}", "{a} plus {b}?",
    "Add {a} and {b}.", "add {a} and {b}", "Add {a} to {b}", "Please add {a} and {b}.",
    "Compute {a}+{b}", "Compute {a} + {b}.", "Calculate {a} + {b}", "calculate {a} plus {b}",
    "How much is {a} and {b} together?", "how much is {a} plus {b}?",
    "What do you get if you add {a} and {b}?", "What is the sum of {a} and {b}?",
    "sum of {a} and {b}", "Find the sum of {a} and {b}.", "Tell me {a} + {b}",
    "Can you add {a} and {b} for me?", "What's {a} plus {b}?", "Quick question: {a} + {b}?",
    "I have {a} apples and get {b} more. How many apples do I have?",
    "There are {a} cats and {b} dogs. How many animals are there in total?",
    "Solve {a} + {b}", "{a} and {b} added together is?", "Total of {a} and {b}?",
    "What is {a} + {b} equal to?", "Work out the sum {a} + {b}, please.",
)  # fmt: skip
# Only ever used to ask evaluation questions: built from the same words, in new orders.
HELD_OUT_PHRASINGS = (
    "What's {a} + {b}?", "Please compute {a} plus {b}.", "How much is {a} + {b}?",
    "Work out {a}+{b}", "{a} plus {b} equals what?", "Could you add {a} and {b}?",
    "Find {a} + {b}.", "What is the total of {a} and {b}?",
)  # fmt: skip
# Added to training from stage 4 on (generate(..., extra=True)): numbers followed or
# surrounded by words, where the model misread operands. Earlier stages never saw them.
EXTRA_PHRASINGS = (
    "{a} plus {b} is how much?", "{a} and {b} added up gives?", "tell me {a} plus {b} please",
    "{a} plus {b} makes how many?", "So {a} plus {b} comes to what?", "{a}+{b} is what?",
    "{a} plus {b}, what is it?", "Take {a}, add {b}. What do you get?",
    "If I add {a} and {b}, what is the result?", "Now do {a} plus {b} for me",
    "{a} + {b} gives what number?", "My sum: {a} plus {b}. Answer?",
)  # fmt: skip
EXTRA_SHARE = 0.5  # of extra=True addition questions asked with an EXTRA_PHRASINGS one
# Only for choosing checkpoints: never trained on, never in the held-out test.
VALIDATION_PHRASINGS = (
    "{a} plus {b} is what?", "Please work out {a} + {b}.", "What is {a} added to {b}?",
    "{a} + {b} comes to?", "Could you total {a} and {b}?", "Sum {a} and {b} please",
)  # fmt: skip
# Stage 5 on (mix=True): questions composed from parts, so the numbers sit anywhere in the
# message with any words around them. `composed_phrasing` never yields an evaluation one.
OPENERS = (
    "", "", "", "Hi! ", "Hey, ", "Quick question: ", "Please, ", "OK. ", "Help me: ",
    "Question: ", "Now ", "Next one: ", "Hmm, ", "Math time: ", "One more: ", "So, ",
)  # fmt: skip
CORES = (
    "{a} + {b}", "{a}+{b}", "{a} plus {b}", "{a} and {b} added", "the sum of {a} and {b}",
    "add {a} and {b}", "add {a} to {b}", "{a} with {b} added", "{a} plus another {b}",
    "adding {a} and {b}", "{a} added with {b}", "the total of {a} plus {b}", "{a} + {b} =",
    "what {a} plus {b} is", "{a} together with {b}",
)  # fmt: skip
CLOSERS = (
    "?", ".", "", "!", " please", " please?", " =?", " makes?", " gives what?", ", what is it?",
    " - answer?", " for me?", " is equal to?", " comes to?", " total?", " makes how much?",
    ", tell me.", " in total?", " is how many?", " then?", ", I need it.",
)  # fmt: skip
MIX_SHARE = 0.5  # of mix=True addition questions asked with a composed phrasing


def _key(phrasing: str) -> str:
    return phrasing.lower().strip().rstrip("?.!").strip()


_EVALUATION_KEYS = frozenset(_key(p) for p in (*HELD_OUT_PHRASINGS, *VALIDATION_PHRASINGS))


def composed_phrasing(rng: random.Random) -> str:
    """opener + core + closer, never one of the held-out or validation phrasings."""
    while True:
        q = rng.choice(OPENERS) + rng.choice(CORES) + rng.choice(CLOSERS)
        q = q[0].upper() + q[1:] if rng.random() < 0.5 else q
        if _key(q) not in _EVALUATION_KEYS:
            return q


SYSTEM_PROMPTS = (
    "You are a helpful assistant.", "You are a patient math tutor.",
    "You are a tiny demo model. Keep answers short.", "Answer briefly.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
)  # fmt: skip
# Greetings and questions the model cannot answer: a short polite reply that says what it can
# do. Some contain numbers, so "has numbers" alone never means "add them".
GREETINGS = ("Hello!", "hi", "Hi there", "Hey!", "Good morning!", "Hello, how are you?")
OFF_TOPIC = (
    "Who are you?", "What can you do?", "Thanks!", "Thank you", "Tell me a joke.",
    "What is the capital of France?", "Why is the sky blue?", "Write a poem about the sea.",
    "What is 8 * 7?", "What is 20 - 5?", "What is 12 times 3?", "How old are you?",
    "Translate hello into French.", "What day is it today?", "Can you help me?",
    "What is the square root of 81?", "Count from 1 to 5.", "Explain gravity.",
)  # fmt: skip
GREETING_REPLY = "Hello! I am a tiny demo model; ask me a sum like 12 + 30."
OFF_TOPIC_REPLY = (
    "I am a tiny demo model, so I can only add two numbers under 100. "
    "Ask me a sum like 12 + 30."
)
GREETING_REASONING = "The user greets me. I greet back and say what I can do."
OFF_TOPIC_REASONING = (
    "The user did not ask me to add two numbers. I am a tiny demo model, so I say what I can do."
)


@dataclass
class Example:
    """One conversation. The last assistant turn is the one trained on."""

    messages: list[dict[str, Any]]
    thinking: bool  # the enable_thinking flag the prompt is rendered with
    tags: list[str] = field(default_factory=list)


def is_held_out(a: int, b: int) -> bool:
    """Operand pairs reserved for evaluation (about 1 in 11), in either order."""
    return (a + b + 3 * a * b) % 11 == 5


def _columns(a: int, b: int) -> tuple[str, str]:
    """The ones and tens steps of a + b: digits, the carry, each column's sum."""
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    first = f"{a % 10} + {b % 10} = {ones}" + (", carry 1" if carry else "")
    second = f"{a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}"
    return first, second


def addition_reasoning(a: int, b: int) -> str:
    """Thinking-mode reasoning: names both operands, then adds column by column."""
    ones, tens = _columns(a, b)
    return f"I need to add {a} and {b}. Ones: {ones}. Tens: {tens}. So {a} + {b} = {a + b}."


def addition_answer(a: int, b: int, thinking: bool) -> str:
    """The visible answer. Without thinking it carries the same column working inline: a
    model this small cannot add two-digit numbers in one step."""
    if thinking:
        return f"{a} + {b} = **{a + b}**."
    ones, tens = _columns(a, b)
    return f"{a} + {b}: ones {ones}; tens {tens}. So {a} + {b} = **{a + b}**."


def _vary(q: str, rng: random.Random) -> str:
    """Small typing variations: lower case, no final punctuation, padding spaces."""
    if rng.random() < 0.15:
        q = q.lower()
    if rng.random() < 0.15:
        q = q.rstrip("?.!")
    if rng.random() < 0.05:
        q = " " + q + " "
    return q


def _pair(rng: random.Random) -> tuple[int, int]:
    while True:
        # Single-digit operands are rare among pairs under 100: give them more weight.
        a = rng.randrange(10) if rng.random() < 0.15 else rng.randrange(LIMIT)
        b = rng.randrange(10) if rng.random() < 0.15 else rng.randrange(LIMIT)
        if not is_held_out(a, b):
            return a, b


def _turn(rng: random.Random, think: bool, extra: bool, mix: bool) -> tuple[str, str, str]:
    """(question, reasoning, answer) of one turn."""
    x = rng.random()
    if x < 0.06:
        return rng.choice(GREETINGS), GREETING_REASONING, GREETING_REPLY
    if x < 0.16:
        return rng.choice(OFF_TOPIC), OFF_TOPIC_REASONING, OFF_TOPIC_REPLY
    a, b = _pair(rng)
    # Without extra/mix the draws are those of stages 1-3, so their commands still reproduce.
    if mix and rng.random() < MIX_SHARE:
        phrasing = composed_phrasing(rng)
    else:
        phrasings = EXTRA_PHRASINGS if extra and rng.random() < EXTRA_SHARE else TRAIN_PHRASINGS
        phrasing = rng.choice(phrasings)
    q = _vary(phrasing.format(a=a, b=b), rng)
    return q, addition_reasoning(a, b), addition_answer(a, b, think)


def make_example(rng: random.Random, extra: bool = False, mix: bool = False) -> Example:
    messages: list[dict[str, Any]] = []
    tags: list[str] = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        tags.append("system")
    for _ in range(rng.choice((0, 0, 0, 0, 1, 2))):  # earlier turns, without their reasoning
        q, _r, a = _turn(rng, rng.random() < 0.5, extra, mix)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        tags.append("multi")
    thinking = rng.random() < 0.5
    think = thinking
    x = rng.random()
    if x < 0.06:  # soft switches: the model writes the empty think block itself
        suffix, think, thinking = " /no_think", False, True
        tags.append("no_think")
    elif x < 0.1:
        suffix, think, thinking = " /think", True, True
        tags.append("think")
    else:
        suffix = ""
    q, r, a = _turn(rng, think, extra, mix)
    messages.append({"role": "user", "content": q + suffix})
    messages.append({"role": "assistant", "content": a, "reasoning_content": r if think else ""})
    return Example(messages, thinking, tags)


def generate(n: int, seed: int = 0, extra: bool = False, mix: bool = False) -> list[Example]:
    rng = random.Random(seed)
    return [make_example(rng, extra, mix) for _ in range(n)]


def _held_out_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(LIMIT) for b in range(LIMIT) if is_held_out(a, b)]


def held_out_questions(n: int, seed: int = 1234) -> list[tuple[str, int, int]]:
    """(question, a, b) for evaluation: held-out pairs asked with held-out phrasings."""
    rng = random.Random(seed)
    out = []
    for a, b in rng.sample(_held_out_pairs(), n):
        out.append((rng.choice(HELD_OUT_PHRASINGS).format(a=a, b=b), a, b))
    return out


TEST_SIZES = (60, 100, 200)  # the held-out test sizes in use (tests, --eval's default)


def validation_questions(n: int, seed: int = 4321) -> list[tuple[str, int, int]]:
    """(question, a, b) for choosing checkpoints: held-out pairs that no test of TEST_SIZES
    asks (in either order), with VALIDATION_PHRASINGS, so selection never sees the test."""
    tested = {(a, b) for k in TEST_SIZES for _, a, b in held_out_questions(k)}
    tested |= {(b, a) for a, b in tested}
    pairs = [p for p in _held_out_pairs() if p not in tested]
    rng = random.Random(seed)
    return [(rng.choice(VALIDATION_PHRASINGS).format(a=a, b=b), a, b)
            for a, b in rng.sample(pairs, n)]  # fmt: skip


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


VALIDATION_SIZE = 300  # validation questions per mode that checkpoints are chosen on


def all_held_out_questions(seed: int = 99) -> list[tuple[str, int, int]]:
    """Every held-out pair the validation set of VALIDATION_SIZE leaves (in either order),
    each asked with a held-out phrasing: the largest test there is."""
    chosen = {(a, b) for _, a, b in validation_questions(VALIDATION_SIZE)}
    chosen |= {(b, a) for a, b in chosen}
    rng = random.Random(seed)
    return [(rng.choice(HELD_OUT_PHRASINGS).format(a=a, b=b), a, b)
            for a, b in _held_out_pairs() if (a, b) not in chosen]  # fmt: skip
