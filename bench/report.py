"""Tables and plots for benchmark results; every table says what was run, on what, with which settings."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from ..runtime.engine import Engine, GenerationResult


def header(engine: Engine, command: str) -> str:
    """One line naming the command, model, target, dtype and threads of a benchmark run."""
    cfg = engine.artifact.config
    model = Path(cfg.source).name
    return (
        f"command: {command} | model: {model} ({cfg.model['family']}, {cfg.dtype_label}) | "
        f"target: {cfg.target['kind']} on {platform.processor() or platform.machine()} | "
        f"threads: {engine.threads}"
    )


def magicdec_table(results: dict) -> Table:
    """The paper-style table: one row per (batch, context) at its best draft setting."""
    table = Table(title="MagicDec (times in ms; T_SD = (gamma*T_D + T_V) / accepted length)")
    for col in (
        "batch",
        "context",
        "draft/budget",
        "gamma",
        "T_D",
        "T_V",
        "acc. len",
        "T_SD",
        "T_AR",
        "speedup",
        "e2e (batch 2)",
    ):
        table.add_column(col, justify="right")
    for c in results["cells"]:
        table.add_row(
            str(c["batch"]),
            str(c["context"]),
            f"{c['draft']}/{c['budget']}",
            str(c["gamma"]),
            f"{c['T_D_best'] * 1e3:.1f}",
            f"{c['T_V_best'] * 1e3:.1f}",
            f"{c['accepted_length']:.2f}",
            f"{c['T_SD'] * 1e3:.1f}",
            f"{c['T_AR'] * 1e3:.1f}",
            f"{c['speedup']:.2f}x",
            f"{c['e2e_speedup_batch2']:.2f}x",
        )
    return table


def acceptance_table(results: dict) -> Table:
    """Acceptance rate and mean accepted length per context, draft, budget and gamma."""
    table = Table(title="acceptance (greedy, Austen prompts)")
    for col in ("context", "draft/budget/gamma", "acceptance rate", "mean accepted length"):
        table.add_column(col, justify="right")
    for context, acc in results["acceptance"].items():
        for key, rate in acc["acceptance_rate"].items():
            table.add_row(str(context), key, f"{rate:.3f}", f"{acc['accepted_length'][key]:.2f}")
    return table


def plot_speedup(results: dict, path: Path) -> None:
    """PNG: speedup against batch size, one line per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for context in sorted({c["context"] for c in results["cells"]}):
        cells = sorted((c for c in results["cells"] if c["context"] == context), key=lambda c: c["batch"])
        ax.plot(
            [c["batch"] for c in cells], [c["speedup"] for c in cells], marker="o", label=f"{context} tokens"
        )
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title("MagicDec self-speculation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def peers_table(rows: list[dict], fractions: dict) -> Table:
    """Decode throughput per system and cell, with ours (plain and MagicDec) divided by each system.

    ``fractions`` maps (batch, context) to our plain decoding's achieved bytes/s over the measured bandwidth.
    """
    table = Table(title="decoding throughput (greedy; medians)")
    for col in (
        "batch",
        "context",
        "system",
        "prefill tok/s",
        "decode tok/s",
        "repeats",
        "ours plain / it",
        "MagicDec / it",
        "read bandwidth used",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        fraction = fractions.get((r["batch"], r["context"])) if r["system"] == "ours, plain" else None
        table.add_row(
            str(r["batch"]),
            str(r["context"]),
            r["system"],
            f"{r['prefill_tok_s']:.0f}",
            f"{r['decode_tok_s']:.1f}",
            str(r["repeats"]),
            f"{r['plain_ratio']:.2f}x",
            f"{r['magicdec_ratio']:.2f}x",
            f"{fraction:.0%}" if fraction is not None else "",
        )
    return table


def memory_table(rows: list[dict], batch: int, context: int) -> Table:
    """Peak resident memory and model bytes on disk, per system."""
    mib = 1 << 20
    table = Table(title=f"memory decoding batch {batch} x {context} (peak resident set of a fresh process)")
    for col in ("system", "peak resident MiB", "model on disk MiB", "resident / ours"):
        table.add_column(col, justify="right")
    ours = rows[0]["peak_resident_bytes"]
    for r in rows:
        table.add_row(
            r["system"],
            f"{r['peak_resident_bytes'] / mib:.0f}",
            f"{r['model_bytes'] / mib:.0f}",
            f"{r['peak_resident_bytes'] / ours:.2f}x",
        )
    return table


def roofline_table(machine, rows: list[dict]) -> Table:
    """Bytes a decode step reads and the tokens/s the measured bandwidth allows, per (batch, context)."""
    gb = 1e9
    table = Table(
        title=(
            f"roofline: triad bandwidth {machine.bandwidth_median / gb:.1f} GB/s median "
            f"({machine.bandwidth_best / gb:.1f} best), read-only {machine.read_bandwidth / gb:.1f} GB/s, "
            f"fp32 matmul {machine.matmul_flops / gb:.0f} GFLOP/s, {machine.threads} threads; "
            f"max tok/s from the triad"
        )
    )
    for col in ("batch", "context", "weights GB", "KV GB", "step GB", "max tok/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch"]),
            str(r["context"]),
            f"{r['weight_bytes'] / gb:.3f}",
            f"{r['kv_bytes'] / gb:.3f}",
            f"{r['step_bytes'] / gb:.3f}",
            f"{r['max_tok_s']:.1f}",
        )
    return table


def profile_table(title: str, kernels, step_seconds: float, top: int) -> Table:
    """The slowest ``top`` kernels of a profiled step: calls, ms, share of the step's wall time."""
    table = Table(title=f"{title}: {step_seconds * 1e3:.1f} ms a step")
    for col in ("kernel", "calls", "ms", "% of step"):
        table.add_column(col, justify="right")
    for k in kernels[:top]:
        table.add_row(k.name, str(k.calls), f"{k.seconds * 1e3:.2f}", f"{k.seconds / step_seconds:.1%}")
    return table


def decode_rate(results: Sequence[GenerationResult]) -> float | None:
    """Decode tokens/s of one ``generate`` call: new tokens after the first of each sequence (which comes
    from prefill's logits) over the decode time; None when nothing was decoded."""
    s = results[0].stats
    decoded = sum(len(r.token_ids) for r in results) - len(results)
    return decoded / s.decode_seconds if s.decode_seconds else None


def generation_table(results: Sequence[GenerationResult]) -> Table:
    """One row of a ``generate`` call: prefill and decode rates, and what speculation did."""
    s = results[0].stats
    prompt = sum(r.prompt_tokens for r in results)
    rate = decode_rate(results)
    row = {
        "batch": str(len(results)),
        "prompt tokens": str(prompt),
        "prefill tok/s": f"{prompt / s.prefill_seconds:.1f}" if s.prefill_seconds else "-",
        "new tokens": str(sum(len(r.token_ids) for r in results)),
        "decode tok/s": f"{rate:.1f}" if rate else "-",
    }
    if s.auto_choices:
        gammas = sorted({g for _, g, _ in s.auto_choices if g})
        row["auto: plain steps"] = str(sum(g == 0 for _, g, _ in s.auto_choices))
        row["spec rounds"] = str(sum(g > 0 for _, g, _ in s.auto_choices))
        row["gammas"] = ",".join(map(str, gammas)) or "-"
    if s.verify_steps:
        row |= _speculation_cells(results)
    return _one_row_table("generation", row)


def _speculation_cells(results: Sequence[GenerationResult]) -> dict[str, str]:
    s = results[0].stats
    lengths = [n for r in results for n in r.accepted_lengths]
    return {
        "T_D ms": f"{s.draft_seconds / s.draft_steps * 1e3:.1f}" if s.draft_steps else "-",
        "T_V ms": f"{s.verify_seconds / s.verify_steps * 1e3:.1f}",
        "acceptance": f"{s.acceptance_rate:.3f}",
        "mean accepted": f"{sum(lengths) / len(lengths):.2f}" if lengths else "-",
    }


def _one_row_table(title: str, row: dict[str, str]) -> Table:
    table = Table(title=title)
    for column in row:
        table.add_column(column, justify="right")
    table.add_row(*row.values())
    return table


def comparison_table(
    title: str, plain: Sequence[GenerationResult], speculative: Sequence[GenerationResult], setting: str
) -> Table:
    """Plain and speculative decoding of the same prefilled prompts, side by side, with the speedup."""
    table = Table(title=title)
    for column in (
        "decoding",
        "new tokens",
        "decode tok/s",
        "ms/token",
        "T_D ms",
        "T_V ms",
        "acceptance",
        "mean accepted",
        "speedup",
    ):
        table.add_column(column, justify="right")
    base = decode_rate(plain)
    for name, results in (("plain", plain), (f"MagicDec {setting}", speculative)):
        rate = decode_rate(results)
        spec = _speculation_cells(results) if results[0].stats.verify_steps else {}
        table.add_row(
            name,
            str(sum(len(r.token_ids) for r in results)),
            f"{rate:.1f}" if rate else "-",
            f"{1e3 / rate:.1f}" if rate else "-",
            *(spec.get(c, "-") for c in ("T_D ms", "T_V ms", "acceptance", "mean accepted")),
            f"{rate / base:.2f}x" if rate and base else "-",
        )
    return table


def resources_table(artifact: str, resources: dict) -> Table:
    """Per CUDA kernel and arch: registers, shared memory, stack and spills, as ptxas allotted them."""
    table = Table(title=f"CUDA kernel resources of {artifact} (ptxas -v at compile time)")
    for col in ("kernel", "arch", "registers", "shared bytes", "stack bytes", "spill stores", "spill loads"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    rows = sorted(
        ((name, arch, k) for arch, kernels in resources.items() for name, k in kernels.items()),
        key=lambda r: (-r[2]["registers"], r[0], r[1]),
    )
    for name, arch, k in rows:
        cells = (k["registers"], k["shared_bytes"], k["stack_bytes"], k["spill_stores"], k["spill_loads"])
        table.add_row(name, arch, *(str(c) for c in cells))
    return table
