"""``bench grid|peers|roofline|profile|auto|published|memory|resources``: one subcommand per benchmark."""

from __future__ import annotations

from pathlib import Path

import click

from ..constants import DEFAULT_DRAFT, DRAFT_KINDS, SPECULATE_MODES
from .options import (
    artifact_argument,
    batch_context_options,
    budget_option,
    drafts_option,
    gamma_option,
    group,
    int_or_auto,
    json_option,
    measurement_options,
    one_line_errors,
    serving_options,
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
@click.option(
    "--budget",
    callback=int_or_auto,
    default="auto",
    show_default=True,
    help="Draft KV budget of MagicDec, or 'auto': the cost model picks per round.",
)
@click.option(
    "--gamma",
    callback=int_or_auto,
    default="auto",
    show_default=True,
    help="Draft tokens per verification of MagicDec, or 'auto': the cost model picks per round.",
)
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


@bench.command("memory")
@artifact_argument
@click.option("--batch", type=int, default=8, show_default=True, help="Sequences decoded together.")
@click.option("--context", type=int, default=8192, show_default=True, help="Tokens of a sequence at the end.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="Tokens decoded per sequence.")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True, help="llama.cpp flash attn.")
@texts_option
@threads_option
@json_option
@one_line_errors
def memory_cmd(artifact: Path, batch, context, new_tokens, flash_attn, texts, threads, json_path) -> None:
    """Peak resident memory of a decoding batch, ours against llama.cpp, each in a fresh process."""
    from ..interface.bench import measure_memory

    measure_memory(
        artifact,
        batch,
        context,
        new_tokens,
        texts=texts,
        threads=threads,
        flash_attn=flash_attn,
        json_path=json_path,
    )


@bench.command("resources")
@artifact_argument
@json_option
@one_line_errors
def resources_cmd(artifact: Path, json_path) -> None:
    """Registers, shared memory and spills of each CUDA kernel, per arch (recorded by compile; no GPU)."""
    from ..interface.bench import show_resources

    show_resources(artifact, json_path=json_path)


def token_range(_ctx, _param, value: str) -> tuple[int, int]:
    try:
        lo, _, hi = value.partition("-")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise click.BadParameter(f"expected a token range such as 2048-8192, got {value!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise click.BadParameter(f"expected 1 <= low <= high, got {value!r}")
    return bounds


def csv_rates(_ctx, _param, value: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated requests/s (or inf), got {value!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise click.BadParameter(f"rates must be positive, got {value!r}")
    return rates


def csv_modes(_ctx, _param, value: str) -> tuple[str, ...]:
    modes = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [m for m in modes if m not in SPECULATE_MODES]
    if bad or not modes:
        raise click.BadParameter(f"modes are {', '.join(SPECULATE_MODES)}; got {value!r}")
    return modes


def fraction(_ctx, _param, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise click.BadParameter(f"expected a fraction in [0, 1), got {value}")
    return value


@bench.command("serve")
@artifact_argument
@click.option("--url", default=None, help="A running server to load (default: start one in this process).")
@click.option(
    "--context",
    callback=token_range,
    default="2048-8192",
    show_default=True,
    help="Prompt lengths in tokens, uniform over LOW-HIGH (Austen excerpts).",
)
@click.option(
    "--rate",
    "rates",
    callback=csv_rates,
    default="0.2,0.5,1,2",
    show_default=True,
    help="Poisson arrival rates in requests/s (comma-separated; inf sends all at once).",
)
@click.option(
    "--concurrency", type=int, default=None, help="Keep this many requests in flight instead of --rate."
)
@click.option("--requests", type=int, default=64, show_default=True, help="Requests per mode and rate.")
@click.option(
    "--output-tokens", type=int, default=256, show_default=True, help="Tokens generated per request."
)
@click.option(
    "--speculate",
    "modes",
    callback=csv_modes,
    default="off,auto",
    show_default=True,
    help="Modes to run on the same arrivals (comma-separated).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of prompts and arrivals.")
@click.option(
    "--disconnect",
    callback=fraction,
    type=float,
    default=0.0,
    show_default=True,
    help="Fraction of clients that hang up mid-stream.",
)
@click.option(
    "--malformed",
    callback=fraction,
    type=float,
    default=0.0,
    show_default=True,
    help="Fraction of requests sent malformed (each must get a 400).",
)
@click.option("--check", is_flag=True, help="Compare every completed response with its plain single run.")
@serving_options
@texts_option
@threads_option
@json_option
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG of output tokens/s against median time per output token, one curve per mode.",
)
@one_line_errors
def serve_cmd(
    artifact: Path,
    url,
    texts,
    threads,
    json_path,
    plot_path,
    check,
    context,
    rates,
    concurrency,
    requests,
    output_tokens,
    modes,
    seed,
    disconnect,
    malformed,
    **serving,
) -> None:
    """Load a server with Poisson arrivals (or a fixed concurrency) in every --speculate mode: throughput,
    TTFT, TPOT, acceptance and errors, and the throughput/latency plot."""
    from ..bench.serve_load import LoadConfig
    from ..interface.bench_serve import serve_load_bench
    from ..runtime.serving import ServeConfig

    load = LoadConfig(
        context, rates, concurrency, requests, output_tokens, modes, seed, disconnect, malformed
    )
    serve_load_bench(
        artifact,
        load,
        ServeConfig(**serving),
        url=url,
        texts=texts,
        threads=threads,
        check=check,
        json_path=json_path,
        plot_path=plot_path,
    )
