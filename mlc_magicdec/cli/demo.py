"""``demo``: what the product is for, on SmolLM2 and this CPU."""

from __future__ import annotations

import click

from .options import one_line_errors, speculation_options, threads_option


@click.command("demo")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate.")
@speculation_options
@threads_option
@one_line_errors
def demo_cmd(max_new_tokens: int, threads: int | None, **speculation) -> None:
    """Fetch SmolLM2, compile it for this CPU (once), and continue a long Austen prompt twice, plainly and
    with MagicDec, side by side: the same text, the speedup and the acceptance."""
    from ..interface.generate import demo

    demo(max_new_tokens=max_new_tokens, threads=threads, speculation=speculation)
