"""What the commands share: one-line errors, value parsers, and option groups used by several commands."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ..constants import (
    DEFAULT_DRAFT,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_RUNNING,
    DEFAULT_MAX_WAITING,
    DRAFT_KINDS,
)
from ..errors import UserError, one_line


def one_line_errors(fn: Callable) -> Callable:
    """Print user errors (and anything unexpected) as one line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)  # plain echo: never wrapped, whatever the width
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the promise is: never a traceback
            if os.environ.get("MLC_MAGICDEC_DEBUG"):
                raise
            click.echo(
                f"internal error: {type(e).__name__}: {one_line(e)} "
                "(set MLC_MAGICDEC_DEBUG=1 for the traceback)",
                err=True,
            )
            sys.exit(1)

    return wrapper


def group(*decorators: Callable) -> Callable:
    """Several option decorators applied as one, listed in help in the order given."""

    def apply(fn: Callable) -> Callable:
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn

    return apply


def csv_ints(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def csv_drafts(_ctx, _param, value: str) -> list[str]:
    kinds = [v.strip() for v in value.split(",") if v.strip()]
    for kind in kinds:
        if kind not in DRAFT_KINDS:
            raise click.BadParameter(f"unknown draft {kind!r}; choose from {', '.join(DRAFT_KINDS)}")
    return kinds


def int_or_auto(_ctx, _param, value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'auto', got {value!r}") from None


artifact_argument = click.argument("artifact", type=click.Path(path_type=Path))
threads_option = click.option(
    "--threads",
    type=int,
    default=None,
    help="CPU threads for us and every peer (default: $TVM_NUM_THREADS, else all available CPUs).",
)
draft_model_option = click.option(
    "--draft-model",
    type=click.Path(path_type=Path),
    default=None,
    help="Artifact of a smaller model with the same tokenizer to draft with (default: self-drafting).",
)
json_option = click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the results here (JSON).",
)
texts_option = click.option(
    "--text",
    "texts",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Prompt source texts (default: Persuasion, shipped with the package).",
)


def batch_context_options(batches: str, contexts: str) -> Callable:
    """``--batch`` and ``--context``: the cells of a grid."""
    return group(
        click.option(
            "--batch",
            "batches",
            callback=csv_ints,
            default=batches,
            show_default=True,
            help="Batch sizes (comma-separated).",
        ),
        click.option(
            "--context",
            "contexts",
            callback=csv_ints,
            default=contexts,
            show_default=True,
            help="Context lengths in tokens (comma-separated).",
        ),
    )


def gamma_option(default: str | None) -> Callable:
    return click.option(
        "--gamma",
        "gammas",
        callback=csv_ints,
        default=default,
        show_default=default is not None,
        help="Draft lengths to try (comma-separated).",
    )


def budget_option(default: str | None) -> Callable:
    return click.option(
        "--budget",
        "budgets",
        callback=csv_ints,
        default=default,
        show_default=default is not None,
        help="Draft KV budgets, in tokens (comma-separated).",
    )


drafts_option = click.option(
    "--draft",
    "drafts",
    callback=csv_drafts,
    default=DEFAULT_DRAFT,
    show_default=True,
    help=f"Draft views to compare (comma-separated: {','.join(DRAFT_KINDS)}).",
)


def measurement_options(new_tokens: int) -> Callable:
    """``--new-tokens`` and ``--repeats``: how long and how often each setting decodes."""
    return group(
        click.option(
            "--new-tokens",
            type=int,
            default=new_tokens,
            show_default=True,
            help="Tokens decoded per prompt in each timed run.",
        ),
        click.option("--repeats", type=int, default=3, show_default=True, help="Timed repeats (median)."),
    )


sampling_options = group(
    click.option(
        "--max-new-tokens",
        type=int,
        default=128,
        show_default=True,
        help="Most tokens to generate per prompt.",
    ),
    click.option(
        "--temperature", type=float, default=0.0, show_default=True, help="Sampling temperature; 0 is greedy."
    ),
    click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."),
    click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling."),
)

speculation_options = group(
    click.option(
        "--draft",
        type=click.Choice(DRAFT_KINDS),
        default=None,
        help="How the draft compresses the KV cache (default: the artifact's first --draft at compile time, "
        f"else {DEFAULT_DRAFT}).",
    ),
    click.option(
        "--budget",
        callback=int_or_auto,
        default=None,
        help="KV entries the draft attends to (default: the artifact's), or 'auto' to choose per round.",
    ),
    click.option(
        "--gamma",
        callback=int_or_auto,
        default="3",
        show_default=True,
        help="Draft tokens per verification, or 'auto' to choose per round (and decode plainly where "
        "speculation would not pay).",
    ),
)


serving_options = group(  # the serving loop's settings (serve, bench serve)
    click.option(
        "--draft", type=click.Choice(DRAFT_KINDS), default=None, help="Draft view (default: the artifact's)."
    ),
    click.option("--draft-budget", type=int, default=None, help="Default draft KV budget, in tokens."),
    click.option(
        "--max-running",
        type=int,
        default=DEFAULT_MAX_RUNNING,
        show_default=True,
        help="Most requests admitted at once.",
    ),
    click.option(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        show_default=True,
        help="Most tokens per step: one per running request plus a prefill chunk.",
    ),
    click.option(
        "--max-waiting",
        type=int,
        default=DEFAULT_MAX_WAITING,
        show_default=True,
        help="Most queued requests; more get HTTP 429.",
    ),
    click.option(
        "--kv-capacity",
        type=int,
        default=None,
        help="KV pool size in tokens (default: max-running full windows, within half the free memory).",
    ),
)
