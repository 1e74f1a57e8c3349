"""Errors the library raises; the CLI turns each into one line on stderr."""

from __future__ import annotations


class Qwen3ChatError(Exception):
    """Base class: anything the user can fix (bad input, missing file, no network)."""


class ModelLoadError(Qwen3ChatError):
    """A checkpoint folder cannot be loaded; the message names the file or tensor."""


class TokenizerError(Qwen3ChatError):
    """Tokenizer files are missing or malformed."""


class RegistryError(Qwen3ChatError):
    """models.toml is malformed or names an unknown model."""


class DownloadError(Qwen3ChatError):
    """A download failed (404, 401, offline, disk full) or did not verify."""


class RepoNotFoundError(DownloadError):
    """The Hub has no such repository (a 404, not a network or permission problem)."""


class SettingsError(Qwen3ChatError):
    """A generation or conversation setting (budget, max_tokens, text, ...) is invalid.

    `param` names the setting when one is to blame, so a server can say which field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
