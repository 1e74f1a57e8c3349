"""Held-out accuracy of a demo model folder: greedy ChatSession turns in both modes.

The questions come from `data.held_out_questions` (operand pairs and phrasings never used
in training). An answer is right when its bolded number is the sum; the working (the
reasoning when thinking, else the answer's inline columns) must name the two operands
first, in the order they were asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qwen3_chat.chat.session import ChatSession
from qwen3_chat.demo import data
from qwen3_chat.engine.events import Finished
from qwen3_chat.engine.sampling import SamplingParams

MAX_TOKENS = 160  # a reply is under 80 tokens; more means the model is looping


@dataclass
class Outcome:
    question: str
    a: int
    b: int
    thinking: bool
    reasoning: str
    answer: str

    @property
    def value(self) -> int | None:
        """The last bolded whole number of the answer, if any."""
        found = re.findall(r"\*\*(\d+)\*\*", self.answer)
        return int(found[-1]) if found else None

    @property
    def right(self) -> bool:
        return self.value == self.a + self.b

    @property
    def names_operands(self) -> bool:
        """The working starts by naming a and b (a model that misreads them fails this)."""
        working = self.reasoning if self.thinking else self.answer
        return [int(x) for x in re.findall(r"\d+", working)[:2]] == [self.a, self.b]


def ask(model, tokenizer, question: str, thinking: bool, system: str | None = None) -> Finished:
    """One greedy turn of a fresh session."""
    greedy = SamplingParams(temperature=0)
    session = ChatSession(model, tokenizer, system=system, thinking=thinking, sampling=greedy,
                          max_tokens=MAX_TOKENS)  # fmt: skip
    for event in session.send(question):
        if isinstance(event, Finished):
            return event
    raise RuntimeError("the session ended without a Finished event")


def questions_for(n: int | None, validation: bool = False) -> list[tuple[str, int, int]]:
    """n held-out (or validation) questions; n None: all of them (validation: the set that
    checkpoints are chosen on)."""
    if validation:
        return data.validation_questions(data.VALIDATION_SIZE if n is None else n)
    return data.all_held_out_questions() if n is None else data.held_out_questions(n)


def run(model, tokenizer, n: int | None, validation: bool = False) -> list[Outcome]:
    """The questions of `questions_for` in each mode; every third under a system prompt."""
    questions = questions_for(n, validation)
    outcomes = []
    for thinking in (True, False):
        for i, (q, a, b) in enumerate(questions):
            system = data.SYSTEM_PROMPTS[i % len(data.SYSTEM_PROMPTS)] if i % 3 == 2 else None
            done = ask(model, tokenizer, q, thinking, system)
            outcomes.append(Outcome(q, a, b, thinking, done.reasoning, done.answer))
    return outcomes


def evaluate(path: Path, n: int | None, validation: bool = False) -> list[Outcome]:
    from qwen3_chat.weights.loader import load

    model, tokenizer = load(path)
    return run(model, tokenizer, n, validation)


def format_table(outcomes: list[Outcome]) -> str:
    lines = ["mode          right         names operands"]
    for thinking in (True, False):
        rows = [o for o in outcomes if o.thinking == thinking]
        right = sum(o.right for o in rows)
        named = sum(o.names_operands for o in rows)
        lines.append(f"{'thinking' if thinking else 'non-thinking':<13} "
                     f"{right:>3}/{len(rows)} {right / len(rows):6.1%}  "
                     f"{named:>3}/{len(rows)} {named / len(rows):6.1%}")  # fmt: skip
    wrong = [o for o in outcomes if not (o.right and o.names_operands)]
    for o in wrong[:10]:
        lines.append(f"  wrong ({'think' if o.thinking else 'no_think'}): {o.question!r} -> "
                     f"{(o.reasoning + ' | ' + o.answer).strip()[:160]!r}")  # fmt: skip
    return "\n".join(lines)
