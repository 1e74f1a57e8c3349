"""hub.open: one path from a name to a loaded, described model (real folders, real tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from checkpoints import make_checkpoint, tiny_config

from qwen3_chat.demo import DEMO_MODEL_DIR
from qwen3_chat.errors import ModelLoadError, Qwen3ChatError
from qwen3_chat.hub.open import guess_capability, open_model

FAMILY = "family"  # Qwen's published templates, under the shared tokenizer folder


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory) -> Path:
    """A tiny original (float) checkpoint with the demo's tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("float") / "m", tiny_config(),
                           tokenizer_dir=DEMO_MODEL_DIR)  # fmt: skip


def _tokenizer_with(tokenizer_dir: Path, template: Path | None, tmp_path: Path):
    from qwen3_chat.chat.tokenizer import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    if template is not None:
        shutil.copyfile(template, tmp_path / "chat_template.jinja")
    return Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("template, expected", [
    (None, "hybrid"),
    ("Qwen3-hybrid", "hybrid"),
    ("Qwen3-4B-Thinking-2507", "always"),
    ("Qwen3-Instruct-2507", "never"),
])  # fmt: skip
def test_guess_capability_from_qwens_templates(qwen3_tokenizer_dir, tmp_path, template, expected):
    family = qwen3_tokenizer_dir / FAMILY
    path = None if template is None else family / template / "chat_template.jinja"
    assert guess_capability(_tokenizer_with(qwen3_tokenizer_dir, path, tmp_path)) == expected


def test_open_demo_alias_describes_the_model():
    loaded = open_model("demo")
    assert loaded.path == DEMO_MODEL_DIR and loaded.name == "demo"
    assert loaded.capability == "hybrid" and loaded.context_length == 2048
    assert loaded.bits == 16 and loaded.mode_sampling is None
    assert loaded.model.config.num_hidden_layers == 4 and loaded.tokenizer.think_end_id


def test_open_folder_reports_stages_and_quantizes_on_load(float_folder):
    stages: list[tuple[str, str]] = []
    loaded = open_model(str(float_folder), bits=4, progress=lambda *a: stages.append(a))
    assert stages == [("load", f"loading {float_folder}")]  # a local folder downloads nothing
    assert loaded.bits == 4 and loaded.model.config.quantization["bits"] == 4
    assert loaded.context_length is None and loaded.capability == "hybrid"
    original = open_model(str(float_folder), bits=16)
    assert original.bits == 16 and original.model.config.quantization is None


def test_quantized_folder_refuses_other_bits(float_folder, tmp_path):
    from qwen3_chat.hub.open import read_config
    from qwen3_chat.weights.loader import save_model

    q = open_model(str(float_folder), bits=4)
    out = save_model(q.model, read_config(float_folder), tmp_path / "q4",
                     extra_files=[float_folder / "tokenizer.json",
                                  float_folder / "tokenizer_config.json"])  # fmt: skip
    assert open_model(str(out)).bits == 4 and open_model(str(out), bits=4).bits == 4
    for bits in (8, 16):
        with pytest.raises(ModelLoadError, match="already quantized to 4 bits"):
            open_model(str(out), bits=bits)


def test_unknown_names_are_named_errors(tmp_path):
    with pytest.raises(Qwen3ChatError, match="unknown model 'nope'"):
        open_model("nope")
    with pytest.raises(Qwen3ChatError, match="not found"):
        open_model(str(tmp_path / "missing"))


def test_bad_bits_are_refused_before_anything_is_fetched(float_folder):
    for bits in (3, 32):
        with pytest.raises(Qwen3ChatError, match="bits must be 4, 8 or 16"):
            open_model(str(float_folder), bits=bits)
