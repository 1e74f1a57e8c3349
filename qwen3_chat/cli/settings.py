"""Chat settings the user can change mid-chat (/set) or load from a file (/load, --resume).

One table of what each setting accepts, used both for typed values from a saved file and for
text typed after /set, so a hand-edited file and a typo fail with the same clear message.
The sampling knobs' ranges stay SamplingParams' own rules; this module adds the types.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qwen3_chat.engine.defaults import ALWAYS, NON_THINKING, THINKING
from qwen3_chat.errors import Qwen3ChatError

# SamplingParams' fields (a test keeps them equal): named here so that the REPL's help and
# completion do not import MLX. Values are still checked by SamplingParams itself.
KNOBS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty",
         "seed")  # fmt: skip
INT_KNOBS = frozenset({"top_k", "seed"})
LIMITS = ("max_tokens", "budget")
# What each limit accepts, in the REPL's words (ChatSession checks the values themselves).
LIMIT_RULES = {"max_tokens": "a whole number >= 1", "budget": "a whole number >= 0, or off"}
SETTINGS: tuple[str, ...] = (*KNOBS, *LIMITS)
ALIASES = {"temp": "temperature", "max-tokens": "max_tokens"}
UNSET = ("default", "off", "none")  # /set NAME default: back to the mode's default
MODES = {THINKING: True, NON_THINKING: False}
MESSAGE_FLAGS = ("interrupted", "truncated")
TEMPLATE_PREFIX = "template."  # /set template.NAME VALUE: a switch of the chat template


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def check_knob(name: str, value: Any) -> Any:
    """`value` if it suits sampling knob `name` (None = unset), else a clear error.

    The types are checked here (SamplingParams would fail on "hot" with a TypeError); the
    ranges stay SamplingParams' own. The limits (max_tokens, budget) are checked by
    ChatSession when they are set."""
    if name not in KNOBS:
        raise Qwen3ChatError(f"unknown sampling setting {name!r}: one of {', '.join(KNOBS)}")
    if value is None:
        return None
    if not (_is_int(value) if name in INT_KNOBS else _is_number(value)):
        kind = "a whole number" if name in INT_KNOBS else "a number"
        raise Qwen3ChatError(f"{name} must be {kind} (got {value!r})")
    from qwen3_chat.engine.sampling import SamplingParams

    SamplingParams.for_mode(True).replace(**{name: value})
    return value


def parse_setting(name: str, text: str) -> tuple[str, Any]:
    """`/set NAME VALUE` -> (canonical name, value); VALUE `default`/`off` unsets.

    Sampling knobs are checked here; the limits when apply_setting gives them to the session."""
    name = ALIASES.get(name.lower(), name.lower())
    if name not in SETTINGS:
        raise Qwen3ChatError(f"unknown setting {name!r}: one of {', '.join(SETTINGS)}")
    text = text.strip()
    if not text:
        raise Qwen3ChatError(f"usage: /set {name} VALUE")
    if text.lower() in UNSET and name != "max_tokens":
        return name, None
    try:
        value: Any = int(text) if name in INT_KNOBS or name in LIMITS else float(text)
    except ValueError:
        value = text  # the check names the expected type
    return name, check_knob(name, value) if name in KNOBS else value


def apply_setting(session: Any, name: str, value: Any) -> None:
    """Set one value on a ChatSession, which checks the limits itself; a combination of
    sampling settings it rejects changes nothing."""
    if name in LIMITS:
        try:
            setattr(session, name, value)
        except Qwen3ChatError:  # the library's words are typed ("or None"); say the REPL's
            raise Qwen3ChatError(f"{name} must be {LIMIT_RULES[name]} (got {value!r})") from None
    elif session.sampling is not None:  # fixed sampling (e.g. a saved file): edit it
        base = type(session.sampling)()
        session.sampling = replace(session.sampling, **{name: getattr(base, name)
                                                        if value is None else value})
    else:
        old = dict(session.sampling_overrides)
        new = {k: v for k, v in old.items() if k != name}
        if value is not None:
            new[name] = value
        session.sampling_overrides = new
        try:
            for thinking in MODES.values():
                session.sampling_for(thinking)
        except Qwen3ChatError:
            session.sampling_overrides = old
            raise


def set_template_arg(session: Any, name: str, text: str) -> tuple[str, Any]:
    """`/set template.NAME VALUE` on the session -> (NAME, value); `default`/`off` removes
    it. The session checks the name and the value; a refused one changes nothing."""
    from qwen3_chat.chat.template_args import parse_value

    name, text = name[len(TEMPLATE_PREFIX):], text.strip()
    if not text:
        raise Qwen3ChatError(f"usage: /set {TEMPLATE_PREFIX}{name or 'NAME'} VALUE")
    args = {k: v for k, v in session.template_kwargs.items() if k != name}
    value = None if text.lower() in UNSET else parse_value(text)
    if value is not None:
        args[name] = value
    session.template_kwargs = args
    return name, value


def template_arg_warning(name: str) -> str:
    """Said when the user sets a switch the model's template never reads (CLI and REPL)."""
    return f"warning: this model's chat template does not use {name}; it has no effect"


def _check_knobs(where: str, knobs: Any) -> None:
    if not isinstance(knobs, dict):
        raise Qwen3ChatError(f"{where} must be a table of sampling settings")
    for name, value in knobs.items():
        try:
            check_knob(name, value)
        except Qwen3ChatError as e:
            raise Qwen3ChatError(f"{where}: {e}") from None


def check_saved(data: Any) -> None:
    """What ChatSession.from_dict does not check itself in a saved conversation: the types
    of the sampling settings, the mode names, and the flags on messages. Called before
    from_dict (which checks the rest), so nothing is replaced when either fails."""
    if not isinstance(data, dict):
        raise Qwen3ChatError("not a saved qwen3-chat conversation")
    if data.get("sampling") is not None:
        _check_knobs("sampling", data["sampling"])
    _check_knobs("sampling_overrides", data.get("sampling_overrides") or {})
    modes = data.get("mode_sampling") or {}
    if not isinstance(modes, dict) or not set(modes) <= set(MODES):
        raise Qwen3ChatError("mode_sampling must map thinking / non_thinking to settings")
    for mode, knobs in modes.items():
        _check_knobs(f"mode_sampling.{mode}", knobs)
    messages = data.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else [], 1):
        for key in MESSAGE_FLAGS:
            if isinstance(m, dict) and not isinstance(m.get(key, False), bool):
                raise Qwen3ChatError(f"message {i}: {key} must be true or false")


def describe(session: Any, model_name: str) -> list[tuple[str, str]]:
    """(label, value) rows for /settings: model, mode, sampling per mode, limits, system."""
    mode = "thinking" if session.thinking else "non-thinking"
    rows = [("model", f"{model_name} ({session.capability})"), ("mode", mode)]
    for label, thinking in MODES.items():
        if thinking and not session.can_think or not thinking and session.capability == ALWAYS:
            continue
        p = session.sampling_for(thinking)
        seed = "random" if p.seed is None else str(p.seed)
        rows.append((f"sampling ({label.replace('_', '-')})",
                     f"temperature {p.temperature:g} · top_p {p.top_p:g} · top_k {p.top_k} · "
                     f"min_p {p.min_p:g} · presence_penalty {p.presence_penalty:g} · "
                     f"repetition_penalty {p.repetition_penalty:g} · seed {seed}"))  # fmt: skip
    budget = "off" if session.budget is None else f"{session.budget} tokens"
    rows.append(("limits", f"max_tokens {session.max_tokens} · budget {budget} · context "
                           f"{session.context_used}/{session.context_length}"))  # fmt: skip
    if session.template_kwargs:
        rows.append(("template", " · ".join(f"{k} {v}" for k, v in
                                            session.template_kwargs.items())))  # fmt: skip
    rows.append(("system prompt", session.system or "(none)"))
    return rows
