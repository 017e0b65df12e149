"""``serve``: the OpenAI-compatible server over a compiled artifact."""

from __future__ import annotations

from pathlib import Path

import click

from ..constants import SPECULATE_MODES
from .options import artifact_argument, draft_model_option, one_line_errors, serving_options, threads_option


@click.command("serve")
@artifact_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--speculate",
    type=click.Choice(SPECULATE_MODES),
    default="auto",
    show_default=True,
    help="Default for requests that do not set it: speculate when the cost model predicts a gain, "
    "always, or never.",
)
@serving_options
@draft_model_option
@threads_option
@one_line_errors
def serve_cmd(
    artifact: Path, host: str, port: int, draft_model: Path | None, threads: int | None, **config
) -> None:
    """Serve the compiled ARTIFACT with an OpenAI-compatible API (completions and chat, streaming)."""
    from ..tvm_loading import runtime_only

    runtime_only([artifact, *([draft_model] if draft_model else [])])
    from ..interface.serve import serve
    from ..runtime.serving import ServeConfig

    serve(artifact, ServeConfig(**config), host=host, port=port, threads=threads, draft_model=draft_model)
