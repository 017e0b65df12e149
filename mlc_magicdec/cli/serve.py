"""``serve``: the OpenAI-compatible server over a compiled artifact."""

from __future__ import annotations

from pathlib import Path

import click

from ..constants import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_RUNNING, DEFAULT_MAX_WAITING, DRAFT_KINDS
from .options import artifact_argument, draft_model_option, one_line_errors, threads_option


@click.command("serve")
@artifact_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--speculate",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Default for requests that do not set it: speculate when the cost model predicts a gain, "
    "always, or never.",
)
@click.option(
    "--draft", type=click.Choice(DRAFT_KINDS), default=None, help="Draft view (default: the artifact's)."
)
@click.option("--draft-budget", type=int, default=None, help="Default draft KV budget, in tokens.")
@draft_model_option
@click.option(
    "--max-running",
    type=int,
    default=DEFAULT_MAX_RUNNING,
    show_default=True,
    help="Most requests admitted at once.",
)
@click.option(
    "--max-batch-tokens",
    type=int,
    default=DEFAULT_MAX_BATCH_TOKENS,
    show_default=True,
    help="Most tokens per step: one per running request plus a prefill chunk.",
)
@click.option(
    "--max-waiting",
    type=int,
    default=DEFAULT_MAX_WAITING,
    show_default=True,
    help="Most queued requests; more get HTTP 429.",
)
@click.option(
    "--kv-capacity",
    type=int,
    default=None,
    help="KV pool size in tokens (default: max-running full windows, within half the free memory).",
)
@threads_option
@one_line_errors
def serve_cmd(
    artifact: Path, host: str, port: int, draft_model: Path | None, threads: int | None, **config
) -> None:
    """Serve the compiled ARTIFACT with an OpenAI-compatible API (completions and chat, streaming)."""
    from ..interface.serve import serve
    from ..runtime.serving import ServeConfig

    serve(artifact, ServeConfig(**config), host=host, port=port, threads=threads, draft_model=draft_model)
