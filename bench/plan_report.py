"""The planner's presentation: ``plan``'s JSON, table and speedup plot (the formulas: runtime.costmodel)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from ..runtime.costmodel import (
    MEASURED_CPU,
    AlphaSource,
    Draft,
    Hardware,
    ModelSpec,
    Plan,
    best_plan,
)

MS = 1e3  # seconds -> milliseconds
PLOT_POINTS = 48  # contexts per speedup curve

# The cost model's modes, as ``plan`` names them
IDEAL = "ideal: peak rates, no fixed costs"
REALISTIC = "realistic: achieved rates, kernel launches, all-reduces and round costs fitted on 8xH100"
MEASURED = "measured: this machine's bandwidth and FLOP/s"
CALIBRATED = "calibrated: rates fitted to the artifact's steps timed here"


def planning_mode(hw: Hardware, ideal: bool) -> tuple[Hardware, str]:
    """The hardware ``plan`` uses and the name of its mode: ``hw.ideal()`` with ``ideal``; otherwise ``hw``,
    a GPU preset's realistic terms or a machine measured now."""
    if ideal:
        return hw.ideal(), IDEAL
    return hw, (MEASURED if hw.name == MEASURED_CPU else REALISTIC)


def plans_to_dict(
    model: ModelSpec, hw: Hardware, draft: Draft, alpha: AlphaSource, plans: Sequence[Plan], mode: str
) -> dict[str, Any]:
    """Everything ``plan --json`` prints: the mode, model, hardware, draft, acceptance and one plan per
    cell."""
    if isinstance(alpha, Mapping):
        alpha_out: Any = {str(k): a for k, a in alpha.items()}
    else:
        alpha_out = alpha if isinstance(alpha, float) else repr(alpha)
    return {
        "mode": mode,
        "model": model.to_dict(),
        "hardware": hw.to_dict(),
        "draft": draft.to_dict(),
        "alpha": alpha_out,
        "plans": [p.to_dict() for p in plans],
    }


def plans_table(model: ModelSpec, hw: Hardware, draft: Draft, plans: Sequence[Plan], mode: str) -> Table:
    """One row per (batch, context): times in ms, speedup per gamma, best setting, critical length."""
    gammas = list(plans[0].speedups) if plans else []
    drafter = (
        f"{draft.model.name if draft.model else 'self'}, {'compressed' if draft.compressed else 'full'} KV"
    )
    table = Table(
        title=(
            f"MagicDec cost model ({mode}): {model.name} ({model.param_count / 1e9:.2f}B params, "
            f"{model.dtype_bytes} bytes/element) on {hw.name}; draft: {drafter}; times in ms"
        )
    )
    columns = ("batch", "context", "T_T", "budget", "alpha", "T_D", "T_V(best)")
    columns += (*(f"x g={g}" for g in gammas), "best gamma", "speedup", "critical L", "memory")
    for col in columns:
        table.add_column(col, justify="right")
    for p in plans:
        table.add_row(
            str(p.batch),
            str(p.context),
            f"{p.t_target * MS:.2f}",
            str(p.budget),
            f"{p.alpha:.3f}",
            f"{p.t_draft * MS:.2f}",
            f"{p.t_verify[p.gamma] * MS:.2f}",
            *(f"{p.speedups[g]:.2f}" for g in gammas),
            str(p.gamma),
            f"{p.speedup:.2f}x" if p.speedup > 1 else f"[dim]{p.speedup:.2f}x[/dim]",
            str(p.critical_length) if p.critical_length else "never",
            {None: "-", True: "fits", False: "[red]too big[/red]"}[p.fits],
        )
    return table


def plot_plans(
    model: ModelSpec,
    hw: Hardware,
    draft: Draft,
    alpha: AlphaSource,
    plans: Sequence[Plan],
    budgets: Iterable[int] | None,
    gammas: Iterable[int],
    path: Path,
    mode: str,
) -> None:
    """PNG: predicted speedup (best gamma and budget) against context, one curve per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = None if budgets is None else list(budgets)
    gammas = list(gammas)
    contexts = sorted({p.context for p in plans})
    lo, hi = math.log2(contexts[0]), math.log2(contexts[-1])
    steps = range(PLOT_POINTS)
    grid = sorted({round(2 ** (lo + (hi - lo) * i / (PLOT_POINTS - 1))) for i in steps} | set(contexts))
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({p.batch for p in plans}):
        curve = [
            best_plan(model, hw, batch, c, alpha, budgets, gammas, draft, with_critical_length=False).speedup
            for c in grid
        ]
        (line,) = ax.plot(grid, curve, label=f"batch {batch}")
        cells = sorted((p for p in plans if p.batch == batch), key=lambda p: p.context)
        ax.plot([p.context for p in cells], [p.speedup for p in cells], "o", color=line.get_color())
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("predicted speedup (best gamma, budget)")
    ax.set_title(f"MagicDec: {model.name} on {hw.name} ({mode.split(':')[0]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
