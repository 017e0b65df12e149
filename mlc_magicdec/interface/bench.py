"""``bench grid|peers|roofline|profile|auto|published|memory|resources``: run one benchmark, print its
tables, write its JSON.

Every table is printed under a header naming the command, model, target, dtype and threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..bench import (
    auto_vs_fixed,
    magicdec,
    memory,
    peers,
    profile,
    published,
    published_report,
    report,
    roofline,
)
from ..errors import UserError
from ..fileio import atomic_write_json
from ..manifest import Manifest, ManifestError
from ..runtime.artifact import Artifact
from ..runtime.engine import Engine
from ..runtime.threads import configure_threads
from ..texts import BENCH_NOVEL, read_text
from .console import check_output_folder, command_line, progress, read_prompt, results, status

PROFILE_TOP = 12  # kernels listed per profiled step


def _texts(paths: Sequence[Path]) -> list[str]:
    """The benchmark's prompt sources: the given files, or the novel shipped with the package."""
    return [read_prompt(p) for p in paths] or [read_text(BENCH_NOVEL)]


def _engine(artifact: Path, threads: int | None, *outputs: Path | None) -> tuple[Engine, str]:
    """Check the output folders, load the engine and print the run's header line."""
    for path in outputs:
        check_output_folder(path)
    engine = Engine(artifact, threads=threads)
    header = report.header(engine, command_line())
    results.print(header, highlight=False)
    return engine, header


def grid(
    artifact: Path,
    config: magicdec.BenchConfig,
    *,
    texts: Sequence[Path] = (),
    threads: int | None = None,
    json_path: Path | None = None,
    plot_path: Path | None = None,
) -> dict:
    """The MagicDec grid: T_D, T_V, accepted length, T_SD, T_AR and speedup per (batch, context)."""
    engine, header = _engine(artifact, threads, json_path, plot_path)
    grid_results = magicdec.run(engine, _texts(texts), config, progress=progress)
    grid_results["header"] = header
    results.print(report.magicdec_table(grid_results))
    results.print(report.acceptance_table(grid_results))
    if json_path:
        atomic_write_json(json_path, grid_results)
    if plot_path:
        report.plot_speedup(grid_results, plot_path)
    return grid_results


def compare_peers(
    artifact: Path,
    batches: Sequence[int],
    contexts: Sequence[int],
    settings: peers.PeerSettings,
    *,
    texts: Sequence[Path] = (),
    threads: int | None = None,
    json_path: Path | None = None,
) -> dict:
    """Decoding tokens/s of ours (plain and MagicDec) against transformers and llama.cpp, per cell."""
    engine, header = _engine(artifact, threads, json_path)
    sources = _texts(texts)
    progress("measuring memory bandwidth")
    machine = roofline.measure(engine.threads)
    cells = {
        (b, c): magicdec.prompts_for(engine, sources, c - settings.new_tokens, b)
        for b in batches
        for c in contexts
    }
    rows, notes = peers.compare(engine, cells, settings, progress=progress)
    peers.add_ratios(rows)
    read_bandwidth = machine.read_bandwidth or machine.bandwidth_median  # a decode step only reads
    fractions = peers.bandwidth_fractions(engine, rows, settings.new_tokens, read_bandwidth)
    results.print(report.peers_table(rows, fractions))
    for line in notes + peers.target_lines(rows, fractions):
        results.print(line, highlight=False)
    comparison = {
        "header": header,
        "machine": vars(machine),
        "rows": rows,
        "bandwidth_fraction": [[b, c, f] for (b, c), f in fractions.items()],
        "notes": notes,
    }
    if json_path:
        atomic_write_json(json_path, comparison)
    return comparison


def measure_roofline(
    artifact: Path,
    batches: Sequence[int],
    contexts: Sequence[int],
    *,
    threads: int | None = None,
    json_path: Path | None = None,
) -> dict:
    """This machine's bandwidth and matmul FLOP/s, and the tokens/s they allow the artifact's model."""
    check_output_folder(json_path)
    threads = configure_threads(threads)
    art = Artifact.load(artifact)
    results.print(
        f"command: {command_line()} | model: {art.config.source} ({art.config.dtype_label}) | "
        f"threads: {threads}",
        highlight=False,
    )
    machine = roofline.measure(threads)
    rows = roofline.roofline_rows(art.spec, batches, contexts, machine.bandwidth_median)
    results.print(report.roofline_table(machine, rows))
    measured = {"machine": vars(machine), "rows": rows}
    if json_path:
        atomic_write_json(json_path, measured)
    return measured


def profile_steps(
    artifact: Path,
    batches: Sequence[int],
    contexts: Sequence[int],
    *,
    gamma: int,
    budget: int,
    repeats: int,
    threads: int | None = None,
    json_path: Path | None = None,
) -> list[dict]:
    """Time every kernel of a decode, a verify (``gamma``) and a draft step (``budget``) per cell."""
    engine, _ = _engine(artifact, threads, json_path)
    steps = []
    for batch in batches:
        for context in contexts:
            for step in profile.STEPS:
                with status.status(f"profiling {step} at batch {batch} x {context}"):
                    kernels, wall = profile.profile_step(engine, step, batch, context, gamma, budget, repeats)
                title = f"{profile.step_label(step, gamma, budget)}, batch {batch} x {context}"
                results.print(report.profile_table(title, kernels, wall, PROFILE_TOP))
                steps.append(
                    {
                        "step": step,
                        "batch": batch,
                        "context": context,
                        "step_seconds": wall,
                        "kernels": [vars(k) for k in kernels],
                    }
                )
    if json_path:
        atomic_write_json(json_path, steps)
    return steps


def auto_against_fixed(
    artifact: Path,
    config: auto_vs_fixed.AutoBenchConfig,
    *,
    texts: Sequence[Path] = (),
    threads: int | None = None,
    json_path: Path | None = None,
) -> dict:
    """gamma/budget='auto' against plain decoding and every fixed (gamma, budget), end to end."""
    engine, header = _engine(artifact, threads, json_path)
    comparison = auto_vs_fixed.run(engine, _texts(texts), config, progress=progress)
    comparison["header"] = header
    results.print(auto_vs_fixed.table(comparison))
    if json_path:
        atomic_write_json(json_path, comparison)
    return comparison


def compare_published(*, json_path: Path | None = None) -> dict:
    """The cost model against MagicDec's published GPU figures: the fitted terms, the presets, errors on
    tables A-D, critical lengths, minimum acceptance rates and the memory check."""
    check_output_folder(json_path)
    results.print(f"command: {command_line()} | figures: {published.DATA_FILE}", highlight=False)
    comparison = published.compare(published.load())
    for table in published_report.tables(comparison):
        results.print(table)
    if json_path:
        atomic_write_json(json_path, comparison)
    return comparison


def measure_memory(
    artifact: Path,
    batch: int,
    context: int,
    new_tokens: int,
    *,
    texts: Sequence[Path] = (),
    threads: int | None = None,
    flash_attn: bool = False,
    json_path: Path | None = None,
) -> dict:
    """Peak resident memory decoding ``batch`` x ``context``: ours and llama.cpp, each in a fresh process."""
    engine, header = _engine(artifact, threads, json_path)
    prompts = magicdec.prompts_for(engine, _texts(texts), context - new_tokens, batch)
    source = Path(engine.artifact.config.source)
    threads = engine.threads
    del engine
    progress(f"batch {batch} x {context}: ours, then llama.cpp, each in a fresh process")
    rows = memory.measure(artifact, source, prompts, new_tokens, threads, flash_attn)
    results.print(report.memory_table(rows, batch, context))
    out = {"header": header, "batch": batch, "context": context, "rows": rows}
    if json_path:
        atomic_write_json(json_path, out)
    return out


def show_resources(artifact: Path, *, json_path: Path | None = None) -> dict:
    """The registers, shared memory and spills of a CUDA artifact's kernels, recorded when it was compiled."""
    check_output_folder(json_path)
    try:
        manifest = Manifest.load(artifact)
    except ManifestError as e:
        raise UserError(str(e)) from None
    if not manifest.resources:
        raise UserError(
            f"{artifact} records no kernel resources; they are measured for --target cuda artifacts"
        )
    results.print(f"command: {command_line()}", highlight=False)
    results.print(report.resources_table(str(artifact), manifest.resources))
    if json_path:
        atomic_write_json(json_path, manifest.resources)
    return manifest.resources
