"""``generate``: continue prompts with a compiled artifact."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .options import (
    artifact_argument,
    draft_model_option,
    one_line_errors,
    sampling_options,
    speculation_options,
    threads_option,
)


@click.command("generate")
@artifact_argument
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch).")
@click.option(
    "--prompt-file",
    "prompt_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="File whose text is a prompt (repeat for a batch).",
)
@sampling_options
@click.option("--speculate", is_flag=True, help="Use MagicDec self-speculative decoding.")
@speculation_options
@draft_model_option
@threads_option
@one_line_errors
def generate_cmd(
    artifact: Path,
    prompts: tuple[str, ...],
    prompt_files: tuple[Path, ...],
    speculate: bool,
    draft: str,
    budget: int | str | None,
    gamma: int | str,
    draft_model: Path | None,
    threads: int | None,
    **sampling,
) -> None:
    """Generate continuations of the prompts with the compiled ARTIFACT."""
    from ..interface.console import read_prompt
    from ..interface.generate import generate

    texts = [*prompts, *(read_prompt(p) for p in prompt_files)]
    if not texts:
        raise UserError("give at least one --prompt or --prompt-file")
    speculation = dict(speculate=True, draft=draft, budget=budget, gamma=gamma) if speculate else {}
    generate(artifact, texts, threads=threads, draft_model=draft_model, **sampling, **speculation)
