"""`qwen3 serve`: the OpenAI-compatible server, with the same models and defaults as chat."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from qwen3_chat.cli.usage import BITS_HELP, check_bits_option, usage_exit


def serve(
    model_name: str | None = typer.Option(None, "--model", "-m", metavar="NAME|PATH",
        help="Alias from models.toml, Hugging Face repo id, or local folder [env: QWEN3_MODEL]."),
    host: str = typer.Option("127.0.0.1", "--host",
        help="Address to bind; anything but loopback requires --api-key."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: pick a free one)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="QWEN3_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1 requests."),
    bits: int | None = typer.Option(None, "--bits", help=f"{BITS_HELP}."),
    budget: int | None = typer.Option(None, "--budget", min=0,
        help="Default thinking budget per request [default: the REPL's, 4096]."),
    no_budget: bool = typer.Option(False, "--no-budget", help="Unbounded thinking by default."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
        help="Default most answer tokens per request [default: 8192]."),
    max_queue: int = typer.Option(16, "--max-queue", min=1,
        help="Requests admitted at once (running + waiting); more get 429."),
    cache_entries: int = typer.Option(8, "--cache-entries", min=0,
        help="Conversations whose KV cache is kept for reuse."),
    cache_gb: float = typer.Option(4.0, "--cache-gb", min=0.0,
        help="Memory cap of the kept KV caches, in GB."),
    max_body_mb: float = typer.Option(4.0, "--max-body-mb", min=0.001,
        help="Largest request body accepted, in MB."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions)."""
    from qwen3_chat.engine.defaults import DEFAULT_BUDGET, DEFAULT_MAX_TOKENS
    check_bits_option(bits)
    if api_key is not None and not api_key.strip():
        raise usage_exit("--api-key must not be empty")
    from qwen3_chat.serve.app import bind, is_loopback
    from qwen3_chat.serve.app import serve as run

    if not is_loopback(host) and api_key is None:
        raise usage_exit(f"binding {host} exposes the model to the network: give --api-key "
                     "(or QWEN3_API_KEY), or bind 127.0.0.1")  # fmt: skip

    try:
        sock = bind(host, port)
    except OSError as e:
        raise usage_exit(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    from qwen3_chat.cli.models import default_model
    from qwen3_chat.cli.progress import open_with_status

    name = model_name or default_model(bits)
    loaded = open_with_status(name, bits=bits)
    from qwen3_chat.serve.engine import ServeConfig, ServeEngine

    model_id = Path(name).name if Path(name).expanduser().is_dir() else name
    config = ServeConfig(
        model_id=model_id, capability=loaded.capability, context_length=loaded.context_length,
        budget=None if no_budget else (DEFAULT_BUDGET if budget is None else budget),
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        mode_sampling=loaded.mode_sampling, max_queue=max_queue,
        cache_entries=cache_entries, cache_bytes=int(cache_gb * 1e9),
    )  # fmt: skip
    engine = ServeEngine(loaded.model, loaded.tokenizer, config)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    typer.echo(f"qwen3 serve: {model_id} on http://{shown}:{bound[1]}/v1 (Ctrl-C to stop)",
               err=True)  # fmt: skip
    sys.stderr.flush()
    run(engine, sock, model_ids=[model_id, name], api_key=api_key,
        max_body=int(max_body_mb * 1e6))  # fmt: skip
    typer.echo("qwen3 serve: stopped", err=True)


def register(app: typer.Typer) -> None:
    app.command(name="serve")(serve)

