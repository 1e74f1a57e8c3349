"""Template switches (e.g. Qwen3.6's `preserve_thinking`): extra variables for the chat template.

A model's template may read variables beyond `enable_thinking`; the user passes them by name.
They are checked once here, so a bad one fails when set, not mid-turn inside the template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qwen3_chat.chat.tokenizer import template_variables
from qwen3_chat.errors import SettingsError

# Variables ChatSession itself gives the template: a switch may not replace them.
RESERVED = frozenset({"messages", "add_generation_prompt", "enable_thinking", "tools",
                      "documents"})  # fmt: skip
Value = bool | int | str


def check_template_kwargs(value: Any) -> dict[str, Value]:
    """A copy of `value` if it is a dict of identifier -> bool/int/str, else a SettingsError."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SettingsError(f"template_kwargs must be a dict, not {type(value).__name__}")
    out: dict[str, Value] = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise SettingsError(f"template argument name {name!r} is not a plain identifier")
        if name in RESERVED:
            raise SettingsError(f"template argument {name!r} is set by the session itself")
        if not isinstance(v, bool | int | str):
            raise SettingsError(f"template argument {name} must be true/false, a whole number "
                                f"or text, not {type(v).__name__}")  # fmt: skip
        out[name] = v
    return out


def parse_template_arg(text: str) -> tuple[str, Value]:
    """`NAME=VALUE` (the CLI's --template-arg) -> (name, value); true/false and whole numbers
    become bool and int, anything else stays text."""
    name, sep, raw = text.partition("=")
    if not sep:
        raise SettingsError(f"template argument {text!r} must be NAME=VALUE")
    name = name.strip()
    return name, next(iter(check_template_kwargs({name: parse_value(raw.strip())}).values()))


def parse_value(raw: str) -> Value:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return int(raw)
    except ValueError:
        return raw


def ignored_by_template(tokenizer: Any, names: Any) -> list[str]:
    """The names among `names` that the tokenizer's chat template never reads."""
    source = getattr(tokenizer, "chat_template", None)
    used = template_variables(source) if source else frozenset()
    return [n for n in names if n not in used]
