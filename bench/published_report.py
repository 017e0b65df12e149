"""``bench published``'s tables: the fitted GPU terms, the presets, and the planner against MagicDec's figures
(the numbers: ``bench.published.compare``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.table import Table

from .published import QUANTITIES

GB = 1e9
US = 1e6


def _table(title: str, columns: Iterable[str]) -> Table:
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def terms_table(report: dict[str, Any]) -> Table:
    """The four fitted terms, as fitted and as the presets carry them."""
    table = _table(
        "GPU terms fitted on MagicDec's tables A-C (8xH100, Llama-3.1-8B + Llama-3.2-1B), shared by every "
        "GPU preset",
        ("term", "fitted", "preset (GPU_FIT)"),
    )
    for term, value in report["fitted"]["terms"].items():
        table.add_row(term, f"{value:.3g}", f"{report['fitted']['preset'][term]:.3g}")
    return table


def presets_table(report: dict[str, Any]) -> Table:
    """Each GPU preset's spec-sheet peaks and link, with the shared fitted terms."""
    table = _table(
        "GPU presets: spec-sheet peaks and links (hardware.py cites the sheets), the fitted terms above",
        (
            "preset",
            "HBM GB/s",
            "achieved",
            "TFLOP/s",
            "achieved",
            "link GB/s",
            "hop us",
            "launch us",
            "round ms",
        ),
    )
    for name, hw in report["presets"].items():
        table.add_row(
            name,
            f"{hw['bandwidth'] / GB:.0f}",
            f"{hw['bandwidth'] * hw['bandwidth_efficiency'] / GB:.0f}",
            f"{hw['peak_flops'] / 1e12:.0f}",
            f"{hw['peak_flops'] * hw['flops_efficiency'] / 1e12:.0f}",
            f"{hw['link_bandwidth'] / GB:.0f}",
            f"{hw['link_latency_s'] * US:.2f}",
            f"{hw['launch_s'] * US:.2f}",
            f"{hw['round_s'] * 1e3:.3f}",
        )
    return table


def measured_table(report: dict[str, Any]) -> Table:
    """Tables A-C row by row: published, predicted (realistic 8xH100) and the error of each quantity."""
    table = _table(
        "Tables A-C on the realistic 8xh100-sxm preset: published / predicted (error); times in ms",
        ("table", "batch", *QUANTITIES),
    )
    rows: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for e in report["measured"]:
        rows.setdefault((e["table"], e["batch"]), {})[e["quantity"]] = e
    for (name, batch), cells in rows.items():
        table.add_row(
            name,
            str(batch),
            *(
                f"{cells[q]['published']:.2f} / {cells[q]['predicted']:.2f} ({cells[q]['error']:+.1%})"
                for q in QUANTITIES
            ),
        )
    return table


def theory_table(report: dict[str, Any]) -> Table:
    """Table D in the ideal mode on the closest preset."""
    d = report["theory"]
    table = _table(
        f"Table D (theory, Llama-3.2-1B self-speculation) in the ideal mode on {d['hardware']} (the preset "
        f"and count closest to its target times), budget {d['budget']} (the planner budget closest to its "
        "speedups)",
        ("batch", "target_time ms", "speedup"),
    )
    rows: dict[int, dict[str, dict[str, Any]]] = {}
    for e in d["rows"]:
        rows.setdefault(e["batch"], {})[e["quantity"]] = e
    for batch, cells in rows.items():
        table.add_row(
            str(batch),
            *(
                f"{c['published']:.3f} / {c['predicted']:.3f} ({c['error']:+.1%})"
                for c in (cells["target_time"], cells["speedup"])
            ),
        )
    return table


def summary_table(report: dict[str, Any]) -> Table:
    """Median and worst absolute error per quantity, over A-C and over D."""
    table = _table("Errors: median / worst absolute relative error", ("rows", "quantity", "median", "worst"))
    for rows, summary in (("A-C", report["measured_summary"]), ("D", report["theory"]["summary"])):
        for quantity, e in summary.items():
            table.add_row(rows, quantity, f"{e['median']:.1%}", f"{e['worst']:.1%}")
    return table


def critical_table(report: dict[str, Any]) -> Table:
    """Critical lengths per preset, mode and batch, under the authors' statements."""
    c = report["critical_lengths"]
    batches = list(next(iter(next(iter(c["predicted"].values())).values())))
    statements = "; ".join(s["statement"] for s in c["published"])
    table = _table(
        f"Critical sequence length, Llama-3.1-8B self-speculation, alpha {c['alpha']}, best gamma and "
        f"budget. The authors: {statements}",
        ("preset", "mode", *(f"batch {b}" for b in batches)),
    )
    for name, modes in c["predicted"].items():
        for mode, lengths in modes.items():
            table.add_row(name, mode, *(str(lengths[b]) if lengths[b] else "never" for b in batches))
    return table


def minimum_acceptance_table(report: dict[str, Any]) -> Table:
    """Predicted minimum acceptance rates beside the authors'."""
    m = report["minimum_acceptance"]
    prompts = list(m["published"])
    lo, hi = m["budgets"]
    table = _table(
        f"Minimum acceptance rate for any speedup, batch {m['batch']}, {m['hardware']}, budgets {lo} / {hi}",
        ("model", "mode", *(f"prompt {p}" for p in prompts)),
    )
    table.add_row("authors", "", *(f"{m['published'][p]:.2f}" for p in prompts))
    for model, modes in m["predicted"].items():
        for mode, rates in modes.items():
            cells = (" / ".join(f"{r:.3f}" if r is not None else "never" for r in rates[p]) for p in prompts)
            table.add_row(model, mode, *cells)
    return table


def memory_table(report: dict[str, Any]) -> Table:
    """The memory check against the rows that ran and the one that ran out of memory."""
    table = _table(
        "Memory: the batches that ran (fits) and did not (out of memory)",
        ("table", "batch", "published", "predicted"),
    )
    for r in report["out_of_memory"]:
        table.add_row(
            r["table"],
            str(r["batch"]),
            *("fits" if v else "out of memory" for v in (r["published"], r["predicted"])),
        )
    return table


def tables(report: dict[str, Any]) -> list[Table]:
    """Every table of the report, in reading order."""
    return [
        terms_table(report),
        presets_table(report),
        measured_table(report),
        theory_table(report),
        summary_table(report),
        critical_table(report),
        minimum_acceptance_table(report),
        memory_table(report),
    ]
