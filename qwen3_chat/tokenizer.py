"""Qwen3 tokenizer: `tokenizers` for BPE, jinja2 for the model's own chat template.

The template is rendered the way transformers' `apply_chat_template` renders it (same
sandboxed environment, filters and globals), so prompts are byte-identical without
depending on transformers at run time. Special token ids come from the files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from qwen3_chat.errors import TokenizerError

REPLACEMENT = "\ufffd"


class _GenerationTag(Extension):
    """Accept `{% generation %}` blocks (used for assistant masks) and render their body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Like transformers: no HTML escaping, unlike jinja's built-in tojson.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path.name}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name}: expected a JSON object")
    return data


class StreamingDetokenizer:
    """Turns token ids into text as they arrive, never splitting a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; such a tail decodes to
    U+FFFD, so it is held back until a later token completes it. Only the pending tokens
    since the last clean boundary are decoded, so each step is O(1).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._pending: list[int] = []

    def add(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._tok.decode(self._pending)
        if text.endswith(REPLACEMENT):
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self._tok.decode(self._pending) if self._pending else ""
        self._pending.clear()
        return text


class Tokenizer:
    def __init__(
        self,
        backend: _HFTokenizer,
        chat_template: str | None,
        eos_tokens: Iterable[str],
        eos_ids: Iterable[int],
        special_tokens: dict[str, str],
    ):
        self._tok = backend
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # bos_token, eos_token, ... passed to the template
        ids = set(eos_ids)
        for name in eos_tokens:
            tid = backend.token_to_id(name)
            if tid is not None:
                ids.add(tid)
        self.eos_ids: frozenset[int] = frozenset(ids)
        self.think_start_id = backend.token_to_id("<think>")
        self.think_end_id = backend.token_to_id("</think>")
        self.im_end_id = backend.token_to_id("<|im_end|>")
        self.im_start_id = backend.token_to_id("<|im_start|>")
        pad = special_tokens.get("pad_token")
        self.pad_id = backend.token_to_id(pad) if pad else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise TokenizerError(f"{path}: no tokenizer.json")
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"tokenizer.json: cannot parse ({e})") from None
        config = _read_json(path / "tokenizer_config.json")
        template = cls._find_template(path, config)
        gen_path = path / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.exists() else {}
        eos = gen.get("eos_token_id", [])
        eos_ids = [eos] if isinstance(eos, int) else [i for i in eos if isinstance(i, int)]
        special = {
            name: content
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (content := _token_content(config.get(name)))
        }
        eos_tokens = [special["eos_token"]] if "eos_token" in special else []
        return cls(backend, template, eos_tokens, eos_ids, special)

    @staticmethod
    def _find_template(path: Path, config: dict) -> str | None:
        # Newer transformers saves the template beside the config, and that file wins.
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens in it parsed as such, no BOS added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's template, as transformers does (tokenize=False)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template")
        chat = []
        for m in messages:
            # transformers drops None values and aliases reasoning fields before rendering.
            msg = {k: v for k, v in m.items() if v is not None}
            reasoning = next(
                (msg[k] for k in ("reasoning_content", "thinking", "reasoning") if k in msg), None
            )
            if reasoning is not None:
                msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
            chat.append(msg)
        try:
            return _compile(self.chat_template).render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, "enable_thinking": enable_thinking, **kwargs},
            )
        except TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None
