"""Tables and the throughput/latency plot of the load benchmark (``serve_load.py``)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _where(run: dict) -> str:
    if run["rate"] is None:
        return f"c={run['concurrency']}"
    return "burst" if math.isinf(run["rate"]) else f"{run['rate']:g}/s"


def _share(spec: float, plain: float) -> str:
    return f"{100 * spec / (spec + plain):.0f}" if spec + plain else "-"


def load_table(results: dict, title: str) -> Table:
    """One row per (rate, mode): throughput, TTFT (with its queueing and prefill) and TPOT percentiles,
    acceptance, the mean decode batch and the share of speculative rounds, the step seconds of prefill and
    decoding, preemptions and errors."""
    table = Table(title=title)
    columns = (
        "rate",
        "mode",
        "done",
        "req/s",
        "out tok/s",
        "TTFT p50/p90/p99 s",
        "queue p50 s",
        "prefill p50 s",
        "TPOT p50/p90/p99 ms",
        "accept",
        "batch",
        "spec %",
        "prefill/decode s",
        "preempt",
        "errors",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for run in results["runs"]:
        ttft, tpot = run["ttft_s"], run["tpot_s"]
        steps = run["step_seconds"]
        table.add_row(
            _where(run),
            run["mode"],
            f"{run['completed']}/{run['requests']}",
            "-" if run["request_throughput"] is None else f"{run['request_throughput']:.3f}",
            "-" if run["output_tokens_per_s"] is None else f"{run['output_tokens_per_s']:.1f}",
            "/".join(_s(ttft[p]) for p in ("p50", "p90", "p99")),
            _s(run["queue_s"]["p50"]),
            _s(run["prefill_s"]["p50"]),
            "/".join(_ms(tpot[p]) for p in ("p50", "p90", "p99")),
            "-" if run["acceptance_rate"] is None else f"{run['acceptance_rate']:.2f}",
            "-" if run.get("mean_batch") is None else f"{run['mean_batch']:.1f}",
            _share(run["speculative_rounds"], run["plain_steps"]),
            f"{steps['prefill']:.0f}/{steps['decoding']:.0f}",
            f"{run['preemptions']:.0f}",
            str(len(run["errors"])),
        )
    return table


def ratio_table(results: dict, base: str = "off") -> Table:
    """Each mode against ``base`` at the same rate: median TPOT and output tokens/s ratios."""
    table = Table(title=f"against speculate={base}, same arrivals")
    for col in ("rate", "mode", "TPOT p50 ratio", "out tok/s ratio", "decoding s ratio"):
        table.add_column(col, justify="right")
    by_key = {(_where(r), r["mode"]): r for r in results["runs"]}
    for run in results["runs"]:
        ref = by_key.get((_where(run), base))
        if run["mode"] == base or ref is None:
            continue
        ratios = [
            _ratio(run["tpot_s"]["p50"], ref["tpot_s"]["p50"]),
            _ratio(run["output_tokens_per_s"], ref["output_tokens_per_s"]),
            _ratio(run["step_seconds"]["decoding"], ref["step_seconds"]["decoding"]),
        ]
        table.add_row(_where(run), run["mode"], *ratios)
    return table


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def plot_load(results: dict, path: Path, title: str) -> None:
    """PNG: output tokens/s against median TPOT, one curve per mode over the rates (the paper's Fig. 1b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["mode"] == mode and r["tpot_s"]["p50"] is not None]
        ax.plot(
            [1000 * r["tpot_s"]["p50"] for r in runs],
            [r["output_tokens_per_s"] for r in runs],
            marker="o",
            label=f"speculate={mode}",
        )
        for r in runs:
            ax.annotate(
                _where(r),
                (1000 * r["tpot_s"]["p50"], r["output_tokens_per_s"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4),
            )
    ax.set_xlabel("median time per output token (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
