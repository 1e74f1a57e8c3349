"""Qwen's recommended defaults and the thinking capabilities: the one place each is stated.

MLX-free, so the registry, the CLI's help text and servers read them without loading MLX.
"""

from __future__ import annotations

# What a model's chat template allows: "hybrid" (Qwen3: /think and /no_think switch),
# "always" (Thinking-2507: the template always opens <think>), "never" (Instruct-2507).
HYBRID, ALWAYS, NEVER = "hybrid", "always", "never"
CAPABILITIES = (HYBRID, ALWAYS, NEVER)

# The two modes a turn can run in, as models.toml and saved conversations name them.
THINKING, NON_THINKING = "thinking", "non_thinking"
MODES = (THINKING, NON_THINKING)

# Qwen's model cards: sampling, not greedy decoding (greedy makes Qwen3 repeat itself).
QWEN_SAMPLING: dict[str, dict[str, float]] = {
    THINKING: {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    NON_THINKING: {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}

# Room for long answers (Qwen recommends 32768 for hard problems; this fits most chats).
DEFAULT_MAX_TOKENS = 8192
# Thinking budget when none is given: long enough for Qwen3's usual reasoning on everyday
# questions, short enough that a runaway chain of thought ends within a minute or two.
DEFAULT_BUDGET = 4096

# Bounds of two sampling settings, checked by SamplingParams and shown by the CLI's options.
SEED_MAX = 2**64 - 1  # MLX builds its PRNG key from an unsigned 64-bit seed
# Qwen's cards use 0 to 2 (1.5 against endless repetition); OpenAI's API also allows down to
# -2, which favours tokens already seen (the penalty is subtracted, so the maths is the same).
PRESENCE_PENALTY_MIN, PRESENCE_PENALTY_MAX = -2.0, 2.0


def mode_name(thinking: bool) -> str:
    return THINKING if thinking else NON_THINKING


def allows_thinking(capability: str, thinking: bool) -> bool:
    """Whether a model of `capability` can run a turn in that mode."""
    return capability == HYBRID or (capability == ALWAYS) == thinking
