"""ChatSession's settings: each is checked when assigned, so a bad one fails by name there,
never mid-turn; and the mode a turn runs in (soft switch, capability, budget)."""

from __future__ import annotations

from typing import Any

from qwen3_chat.chat.template_args import check_template_kwargs
from qwen3_chat.chat.turn import check_int, check_text
from qwen3_chat.engine.defaults import (
    ALWAYS,
    CAPABILITIES,
    HYBRID,
    NEVER,
    allows_thinking,
    mode_name,
)
from qwen3_chat.engine.sampling import SamplingParams
from qwen3_chat.errors import SettingsError


def soft_switch(text: str) -> bool | None:
    """Qwen3's soft switch: a message ending in /think or /no_think sets that turn's mode."""
    tail = text.rstrip()
    if tail.endswith("/no_think") or tail.endswith("/nothink"):
        return False
    if tail.endswith("/think"):
        return True
    return None


def check_thinking(on: Any) -> bool:
    if not isinstance(on, bool):
        raise SettingsError(f"thinking must be True or False, not {on!r}")
    return on


def check_capability(capability: Any) -> str:
    if capability not in CAPABILITIES:
        raise SettingsError(f"capability must be one of {', '.join(CAPABILITIES)}, "
                            f"not {capability!r}")  # fmt: skip
    return capability


class SessionSettings:
    """The settings half of ChatSession (which sets these attributes in its __init__)."""

    capability: str
    sampling: SamplingParams | None  # None: Qwen's recommended settings for each turn's mode
    # The user's knobs (e.g. only a seed) on top of each mode's defaults, and the
    # defaults themselves per mode ("thinking" / "non_thinking", e.g. from models.toml).
    sampling_overrides: dict[str, Any]
    mode_sampling: dict[str, dict[str, Any]]
    _thinking: bool

    @property
    def system(self) -> str | None:
        return self._system

    @system.setter
    def system(self, text: str | None) -> None:
        self._system = check_text("system", text, optional=True) or None

    @property
    def template_kwargs(self) -> dict[str, Any]:
        return dict(self._template_kwargs)  # a copy: assign a new dict, which is checked

    @template_kwargs.setter
    def template_kwargs(self, value: dict[str, Any] | None) -> None:
        self._template_kwargs = check_template_kwargs(value)

    def set_system(self, text: str | None) -> None:
        """Set or (with None or "") remove the system prompt; it applies from the next turn."""
        self.system = text

    @property
    def thinking(self) -> bool:
        return self._thinking

    @thinking.setter
    def thinking(self, on: bool) -> None:
        check_thinking(on)
        if not allows_thinking(self.capability, on):
            what = "cannot think" if self.capability == NEVER else "always thinks"
            raise SettingsError(f"this model {what} (capability: {self.capability})")
        self._thinking = on

    @property
    def budget(self) -> int | None:
        return self._budget

    @budget.setter
    def budget(self, tokens: int | None) -> None:
        self._budget = check_int("the thinking budget", tokens, 0, optional=True)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    @max_tokens.setter
    def max_tokens(self, tokens: int) -> None:
        self._max_tokens = check_int("max_tokens", tokens, 1)

    def sampling_for(self, thinking: bool) -> SamplingParams:
        """The sampling of a turn: fixed settings, else the mode's defaults plus overrides."""
        if self.sampling is not None:
            return self.sampling
        base = SamplingParams.for_mode(thinking)
        mode = self.mode_sampling.get(mode_name(thinking), {})
        try:
            return base.replace(**mode).replace(**self.sampling_overrides)
        except TypeError as e:
            raise SettingsError(f"bad sampling setting: {e}") from None

    @property
    def can_think(self) -> bool:
        return self.capability != NEVER

    def thinking_for(self, text: str) -> bool:
        """The mode a turn with this message runs in (soft switch, capability, budget 0)."""
        if self.capability != HYBRID:
            return self.capability == ALWAYS
        switch = soft_switch(text)
        if switch is not None:
            return switch
        return self.thinking and self.budget != 0  # a zero budget means non-thinking mode
