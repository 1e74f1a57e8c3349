"""Qwen3 tokenizer: `tokenizers` for BPE, jinja2 for the model's own chat template.

The template is rendered the way transformers' `apply_chat_template(..., tokenize=False)`
renders it (same sandboxed environment, filters, globals and message preprocessing), so
prompts are byte-identical without depending on transformers at run time. Special token
ids (think, eos, pad) come from the files, never from constants.
"""

from __future__ import annotations

import codecs
import json
import operator
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import ByteLevel as ByteLevelDecoder

from qwen3_chat.errors import TokenizerError

REPLACEMENT = "\ufffd"
# Messages remembered by encode_chat: enough for long chats, a few MB at most.
SEGMENT_CACHE_SIZE = 512
# The special-token names transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")  # fmt: skip
# transformers copies a message's reasoning under all these names before rendering.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ---------------------------------------------------------------- template environment


class _GenerationTag(Extension):
    """Accept `{% generation %}` blocks (transformers uses them for assistant masks)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Like transformers: no HTML escaping (jinja's own tojson turns "<" into \u003c).
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """jinja's `namespace`, refusing underscore attributes (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    return _environment().from_string(source)


@lru_cache(maxsize=8)
def template_variables(source: str) -> frozenset[str]:
    """The names a template reads from its caller (e.g. preserve_thinking): a switch it never
    reads does nothing, which the CLI tells the user."""
    try:
        return frozenset(meta.find_undeclared_variables(_environment().parse(source)))
    except TemplateError as e:
        raise TokenizerError(f"chat template: {e}") from None


@lru_cache(maxsize=1)
def _environment() -> Any:
    # Templates come from downloaded folders: untrusted code, hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, as transformers does (sandbox safety)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Apply transformers' message preprocessing: drop None values, alias reasoning fields."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError("chat messages must be a list of dicts")
    if not messages:
        raise TokenizerError("cannot apply the chat template to an empty conversation")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"chat message {i} is a {type(m).__name__}, not a dict")
        msg = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        chat.append(msg)
    return chat


# ---------------------------------------------------------------- file reading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path.name}: cannot read ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path.name}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _int_ids(value: Any, source: str) -> list[int]:
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise TokenizerError(f"{source}: eos_token_id must be an id or a list of ids")
    return ids


def _byte_decoder() -> dict[str, int]:
    """Inverse of byte-level BPE's byte→printable-char table (GPT-2 scheme)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # unprintable bytes are shifted past 0xFF
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# ---------------------------------------------------------------- streaming detokenizer


class StreamingDetokenizer:
    """Turns token ids into text as they arrive, never splitting a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character. Tokens since the last
    character boundary are kept in a small window (an unfinished character is at most 3
    bytes, so 3 tokens) and decoded together by the real decoder at the boundary, so
    each step costs O(1) and the outputs concatenate to exactly `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._pending: list[int] = []
        # Tracks only whether the window's bytes end mid-character; the text comes from decode().
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_id: int) -> str:
        self._pending.append(token_id)
        raw = self._tok.token_bytes(token_id)
        if raw is None:  # not a byte-level decoder: a trailing U+FFFD means "maybe unfinished"
            text = self._tok.decode(self._pending)
            if text.endswith(REPLACEMENT):
                return ""
        else:
            self._utf8.decode(raw)
            if self._utf8.getstate()[0]:  # bytes of an unfinished character are buffered
                return ""
            text = self._tok.decode(self._pending)
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self._tok.decode(self._pending) if self._pending else ""
        self._pending.clear()
        self._utf8.reset()
        return text


# ---------------------------------------------------------------- tokenizer


class Tokenizer:
    """A Qwen3 tokenizer folder: BPE from tokenizer.json, template and specials from the configs."""

    def __init__(
        self,
        backend: _HFTokenizer,
        chat_templates: dict[str, str],
        special_tokens: dict[str, str],
        eos_ids: Sequence[int],
    ):
        self._tok = backend
        self.chat_templates = chat_templates  # name -> source; "default" is the usual one
        self.chat_template: str | None = chat_templates.get("default")
        self.special_tokens = special_tokens  # bos_token, eos_token, ...: passed to the template
        ids = set(eos_ids)
        eos = backend.token_to_id(special_tokens.get("eos_token", ""))
        if eos is not None:
            ids.add(eos)
        self.eos_ids: frozenset[int] = frozenset(ids)
        self.think_start_id: int | None = backend.token_to_id("<think>")
        self.think_end_id: int | None = backend.token_to_id("</think>")
        self.im_start_id: int | None = backend.token_to_id("<|im_start|>")
        self.im_end_id: int | None = backend.token_to_id("<|im_end|>")
        pad = special_tokens.get("pad_token")
        self.pad_id: int | None = backend.token_to_id(pad) if pad else None
        self._byte_level = isinstance(backend.decoder, ByteLevelDecoder)
        self._bytes_cache: dict[int, bytes] = {}
        self._byte_of = _byte_decoder() if self._byte_level else {}
        self._segments: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and (if present) generation_config.json."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: not a directory")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file}: no such file")
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"tokenizer.json: cannot parse ({e})") from None
        config = _read_json(path / "tokenizer_config.json")
        special = {
            name: content
            for name, value in config.items()
            if (name in _SPECIAL_NAMES or name.endswith("_token"))
            and (content := _token_content(value))
        }
        # generation_config.json is what generate() stops on; without it transformers falls
        # back to config.json's eos_token_id, and so do we.
        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            if (path / name).is_file():
                eos_ids = _int_ids(_read_json(path / name).get("eos_token_id"), name)
                break
        return cls(backend, cls._find_templates(path, config), special, eos_ids)

    @staticmethod
    def _find_templates(path: Path, config: dict) -> dict[str, str]:
        # As in transformers: standalone template files, when present, replace the config's.
        templates: dict[str, str] = {}
        if (path / "chat_template.jinja").is_file():
            templates["default"] = _read_text(path / "chat_template.jinja")
        extra = path / "additional_chat_templates"
        if extra.is_dir():
            for f in sorted(extra.glob("*.jinja")):
                templates[f.stem] = _read_text(f)
        if templates:
            return templates
        template = config.get("chat_template")
        if isinstance(template, str):
            return {"default": template}
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            return {
                t["name"]: t["template"]
                for t in template
                if isinstance(t, dict) and isinstance(t.get("name"), str)
                and isinstance(t.get("template"), str)
            }  # fmt: skip
        if template is not None:
            raise TokenizerError("tokenizer_config.json: chat_template must be a string or a list")
        return {}

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows (the embedding may have more, padded rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes a byte-level token stands for (None for other decoders)."""
        if not self._byte_level:
            return None
        raw = self._bytes_cache.get(token_id)
        if raw is None:
            token = self._tok.id_to_token(token_id) if token_id >= 0 else None
            if token is None:
                raw = b""  # unknown ids decode to nothing
            elif all(c in self._byte_of for c in token):
                raw = bytes(self._byte_of[c] for c in token)
            else:  # the ByteLevel decoder passes such tokens (added ones) through as UTF-8
                raw = token.encode("utf-8")
            self._bytes_cache[token_id] = raw
        return raw

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens in it parsed as such, no BOS added."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text, not {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, text: str) -> list[int]:
        """`encode(text)` for a rendered chat, one `<|im_start|>` segment at a time through
        a cache, so turn N encodes only its new messages. Special tokens are matched before
        normalization and pre-tokenization, so no merge crosses one: the pieces encode
        exactly as the whole (tests check it against a full encode)."""
        if self.im_start_id is None:
            return self.encode(text)
        marker = "<|im_start|>"
        ids: list[int] = []
        for i, part in enumerate(text.split(marker)):
            segment = marker + part if i else part
            if not segment:
                continue
            cached = self._segments.get(segment)
            if cached is None:
                cached = tuple(self.encode(segment))
                if len(self._segments) >= SEGMENT_CACHE_SIZE:
                    self._segments.popitem(last=False)  # the least recently used
                self._segments[segment] = cached
            else:
                self._segments.move_to_end(segment)
            ids.extend(cached)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; ids past the vocabulary decode to nothing, as in transformers."""
        try:
            ids = [operator.index(i) for i in ids]  # accepts numpy / mlx integer scalars
        except TypeError:
            raise TokenizerError("token ids must be integers") from None
        if any(i < 0 for i in ids):
            raise TokenizerError("token ids must be non-negative")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's template, as transformers does (tokenize=False).

        Extra keyword arguments reach the template, as in transformers; they override the
        special token names (bos_token, ...) when both are given.
        """
        source = self.chat_template
        if tools is not None:
            if not all(isinstance(t, Mapping) for t in tools):
                raise TokenizerError("tools must be JSON-schema dicts")
            source = self.chat_templates.get("tool_use", source)
        if source is None:
            raise TokenizerError("this tokenizer has no chat_template")
        chat = _prepare_messages(messages)
        variables = _plain({**self.special_tokens, "enable_thinking": enable_thinking, **kwargs})
        try:
            return _compile(source).render(
                messages=chat,
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None
        except Exception as e:  # a template bug (TypeError, ...) must not surface as a traceback
            raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from None
