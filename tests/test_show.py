"""`qwen3 show`: a model described from its config and safetensors headers, checked against
counts taken independently from the files with the safetensors library."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from checkpoints import make_checkpoint, tiny_config
from safetensors import safe_open
from typer.testing import CliRunner

from qwen3_chat.cli.app import app
from qwen3_chat.demo import DEMO_MODEL_DIR


def show(*args: str) -> dict:
    result = CliRunner().invoke(app, ["show", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def numels(path: Path) -> dict[str, int]:
    """Tensor name -> element count, read with the safetensors library itself."""
    out = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[k] = math.prod(st.get_slice(k).get_shape())
    return out


def test_demo_is_described_exactly():
    info = show("demo")
    n = sum(numels(DEMO_MODEL_DIR).values())
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert info["parameters"] == info["active_parameters"] == n
    assert info["weights_bytes"] == n * 4 and info["compute_dtype"] == "float32"  # CPU
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2048 * 4
    assert info["kv_cache_bytes"] == kv and info["memory_bytes"] == n * 4 + kv
    assert info["disk_bytes"] == sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert (info["capability"], info["context_length"], info["quantization"]) == ("hybrid", 2048,
                                                                                  None)
    assert (info["layers"], info["hidden_size"], info["kind"]) == (
        cfg["num_hidden_layers"], cfg["hidden_size"], "dense")  # the config's, as retrained


def test_text_output_names_every_field():
    result = CliRunner().invoke(app, ["show", "demo"])
    assert result.exit_code == 0
    for label in ("architecture", "layers", "attention", "thinking", "context", "quantization",
                  "parameters", "on disk", "memory"):  # fmt: skip
        assert any(line.startswith(label) for line in result.stdout.splitlines()), label
    n = sum(numels(DEMO_MODEL_DIR).values())  # counted from the file: 0.9M since the retrain
    assert "2,048 tokens" in result.stdout and f"{n / 1e6:.1f}M" in result.stdout


def test_moe_folder_counts_active_parameters(tmp_path):
    cfg = tiny_config(moe=True)
    path = make_checkpoint(tmp_path / "moe", cfg, tokenizer_dir=DEMO_MODEL_DIR)
    sizes = numels(path)
    experts = sum(v for k, v in sizes.items() if ".mlp.experts." in k)
    info = show(str(path))
    assert info["kind"] == "moe" and info["experts"] == 8 and info["experts_per_token"] == 2
    assert info["parameters"] == sum(sizes.values())
    assert info["active_parameters"] == sum(sizes.values()) - experts + experts * 2 // 8
    assert info["context_length"] == cfg["max_position_embeddings"]  # a folder: its config


def test_quantized_folder(tmp_path):
    from qwen3_chat.hub.open import open_model, read_config
    from qwen3_chat.weights.loader import save_model

    src = make_checkpoint(tmp_path / "f", tiny_config(), tokenizer_dir=DEMO_MODEL_DIR)
    q = save_model(open_model(str(src), bits=4).model, read_config(src), tmp_path / "q",
                   extra_files=[src / "tokenizer.json", src / "tokenizer_config.json"])
    plain, quant = show(str(src)), show(str(q))
    assert quant["quantization"] == {"bits": 4, "group_size": 64} and plain["quantization"] is None
    assert quant["parameters"] == plain["parameters"]  # the same network, stored smaller
    assert quant["weights_bytes"] < plain["weights_bytes"] / 3


def test_thinking_capability_comes_from_the_template(tmp_path, qwen3_tokenizer_dir):
    path = make_checkpoint(tmp_path / "t", tiny_config(), tokenizer_dir=qwen3_tokenizer_dir)
    assert show(str(path))["capability"] == "hybrid"
    shutil.copyfile(qwen3_tokenizer_dir / "family" / "Qwen3-4B-Thinking-2507" /
                    "chat_template.jinja", path / "chat_template.jinja")  # fmt: skip
    assert show(str(path))["capability"] == "always"


@pytest.mark.parametrize("args, says", [
    (["qwen3-4b"], "not downloaded; `qwen3 download qwen3-4b` fetches it (about "),
    (["qwen3-4b", "--bits", "8"], "`qwen3 download qwen3-4b --bits 8` fetches it (about "),
    (["no-such-model"], "unknown model"),
])  # fmt: skip
def test_unavailable_models_are_one_line_errors(args, says):
    result = CliRunner().invoke(app, ["show", *args])
    assert result.exit_code == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr


def test_bad_bits_is_a_usage_error():
    result = CliRunner().invoke(app, ["show", "demo", "--bits", "3"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: --bits must be 4, 8 or 16, not 3"


def test_bits_that_a_folder_does_not_have_are_refused():
    """--bits picks a downloaded variant; a folder is described as it is, so asking for other
    bits is a usage error rather than silently ignored (before: demo --bits 8 showed float)."""
    result = CliRunner().invoke(app, ["show", "demo", "--bits", "8"])
    assert result.exit_code == 2 and result.stdout == "", result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "demo" in line and "--bits 8" in line, line
    assert "unquantized" in line and "qwen3 chat -m demo --bits 8" in line, line
    assert show("demo", "--bits", "16")["quantization"] is None  # the bits it has: fine
