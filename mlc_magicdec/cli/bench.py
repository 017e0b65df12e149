"""``bench grid|peers|roofline|profile|auto|published|resources``: the benchmarks, one subcommand each."""

from __future__ import annotations

from pathlib import Path

import click

from ..constants import DEFAULT_DRAFT, DRAFT_KINDS
from .options import (
    artifact_argument,
    batch_context_options,
    budget_option,
    drafts_option,
    gamma_option,
    group,
    json_option,
    measurement_options,
    one_line_errors,
    texts_option,
    threads_option,
)

GRID_CELLS = batch_context_options("1,4,8,16", "1024,2048,4096,8192")
DEFAULT_BUDGET = "256"  # the draft budget the benchmarks measure unless told otherwise
plot_option = click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG of speedup against batch size, one line per context.",
)
one_draft_option = click.option(
    "--draft",
    type=click.Choice(DRAFT_KINDS),
    default=DEFAULT_DRAFT,
    show_default=True,
    help="The draft view.",
)
budget_gamma_options = group(
    click.option(
        "--budget", type=int, default=int(DEFAULT_BUDGET), show_default=True, help="Draft KV budget."
    ),
    click.option("--gamma", type=int, default=1, show_default=True, help="Draft tokens per verification."),
)


@click.group("bench")
def bench() -> None:
    """Benchmarks: the MagicDec grid, peers, the roofline, a kernel profile, auto against fixed settings, and
    the cost model against MagicDec's published GPU figures."""


@bench.command("grid")
@artifact_argument
@GRID_CELLS
@measurement_options(new_tokens=128)
@drafts_option
@budget_option(DEFAULT_BUDGET)
@gamma_option("1,2,3,4")
@texts_option
@threads_option
@json_option
@plot_option
@one_line_errors
def grid_cmd(artifact: Path, texts, threads, json_path, plot_path, **config) -> None:
    """T_D, T_V, accepted length, T_SD, T_AR and speedup over a batch x context grid (the paper's table)."""
    from ..bench.magicdec import BenchConfig
    from ..interface.bench import grid

    grid(
        artifact,
        BenchConfig(**config),
        texts=texts,
        threads=threads,
        json_path=json_path,
        plot_path=plot_path,
    )


@bench.command("peers")
@artifact_argument
@GRID_CELLS
@measurement_options(new_tokens=128)
@one_draft_option
@budget_gamma_options
@click.option(
    "--peer-repeats",
    "slow_repeats",
    type=int,
    default=None,
    help="Decode repeats for the slowest peers (transformers, llama.cpp with flash attention on); "
    "default --repeats.",
)
@texts_option
@threads_option
@json_option
@one_line_errors
def peers_cmd(artifact: Path, batches, contexts, texts, threads, json_path, **settings) -> None:
    """Decoding tokens/s of ours (plain and MagicDec) against transformers and llama.cpp (if installed), on
    the same prompts with the same threads."""
    from ..bench.peers import PeerSettings
    from ..interface.bench import compare_peers

    compare_peers(
        artifact,
        batches,
        contexts,
        PeerSettings(**settings),
        texts=texts,
        threads=threads,
        json_path=json_path,
    )


@bench.command("roofline")
@artifact_argument
@GRID_CELLS
@threads_option
@json_option
@one_line_errors
def roofline_cmd(artifact: Path, batches, contexts, threads, json_path) -> None:
    """Measure memory bandwidth and matmul FLOP/s, and print the tokens/s they allow."""
    from ..interface.bench import measure_roofline

    measure_roofline(artifact, batches, contexts, threads=threads, json_path=json_path)


@bench.command("profile")
@artifact_argument
@GRID_CELLS
@budget_gamma_options
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed repeats per step (median).")
@threads_option
@json_option
@one_line_errors
def profile_cmd(artifact: Path, batches, contexts, threads, json_path, **setting) -> None:
    """Time every kernel of a decode, a verify (--gamma) and a draft step (--budget)."""
    from ..interface.bench import profile_steps

    profile_steps(artifact, batches, contexts, **setting, threads=threads, json_path=json_path)


@bench.command("auto")
@artifact_argument
@GRID_CELLS
@measurement_options(new_tokens=128)
@one_draft_option
@budget_option(DEFAULT_BUDGET)
@gamma_option("1,2,3,4")
@texts_option
@threads_option
@json_option
@one_line_errors
def auto_cmd(artifact: Path, texts, threads, json_path, **config) -> None:
    """gamma/budget='auto' against plain decoding and every fixed --gamma x --budget, end to end."""
    from ..bench.auto_vs_fixed import AutoBenchConfig
    from ..interface.bench import auto_against_fixed

    auto_against_fixed(artifact, AutoBenchConfig(**config), texts=texts, threads=threads, json_path=json_path)


@bench.command("published")
@json_option
@one_line_errors
def published_cmd(json_path) -> None:
    """The cost model against MagicDec's published 8xH100 figures: fit the GPU terms, report every error."""
    from ..interface.bench import compare_published

    compare_published(json_path=json_path)


@bench.command("resources")
@artifact_argument
@json_option
@one_line_errors
def resources_cmd(artifact: Path, json_path) -> None:
    """Registers, shared memory and spills of each CUDA kernel, per arch (recorded by compile; no GPU)."""
    from ..interface.bench import show_resources

    show_resources(artifact, json_path=json_path)
