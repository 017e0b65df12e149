"""A calibration checked against measurements: the cost model's prediction error over a MagicDec bench grid
(``mlc-magicdec bench --json``), a held-out fit on the grid's corner cells, the grid's acceptance curve, and
the tables ``plan --calibrate`` prints.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from ..errors import UserError
from ..runtime import costmodel as cm
from ..runtime.calibration import Calibration, CalibrationDesign, calibrate, save

MS = 1e3
# what each cell of a bench grid must hold for the prediction error (``bench grid --json`` writes them)
GRID_CELL_KEYS = (
    "batch",
    "context",
    "T_AR",
    "T_D",
    "T_V",
    "draft",
    "budget",
    "gamma",
    "accepted_length",
    "speedup",
)


def load_grid(path: Path) -> dict[str, Any]:
    """A MagicDec bench grid written by ``bench grid --json``; a one-line error if ``path`` is not one."""
    try:
        grid = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a bench grid from 'mlc-magicdec bench grid --json' ({e})") from None
    cells = grid.get("cells") if isinstance(grid, dict) else None
    problem = None
    if not isinstance(cells, list) or not cells:
        problem = "it has no cells"
    elif not isinstance(grid.get("acceptance"), dict):
        problem = "it has no acceptance runs"
    else:
        missing = {k for c in cells for k in GRID_CELL_KEYS if not isinstance(c, dict) or k not in c}
        problem = f"its cells lack {', '.join(sorted(missing))}" if missing else None
    if problem:
        raise UserError(f"{path} is not a bench grid from 'mlc-magicdec bench grid --json': {problem}")
    return grid


def alpha_from_length(gamma: int, accepted_length: float) -> float:
    """The ``alpha`` whose ``Omega(gamma, alpha)`` is the measured mean accepted length (bisection)."""
    lo, hi = 0.0, 1.0
    if accepted_length >= gamma + 1:
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cm.omega(gamma, mid) < accepted_length else (lo, mid)
    return (lo + hi) / 2


def grid_acceptance(grid: Mapping[str, Any], draft: str) -> dict[int, float]:
    """``{budget: alpha}`` from a bench grid's accepted lengths: median over contexts and gammas."""
    per_budget: dict[int, list[float]] = {}
    for acc in grid["acceptance"].values():
        for key, length in acc["accepted_length"].items():
            kind, budget, gamma = key.split("/")
            if kind == draft:
                per_budget.setdefault(int(budget), []).append(alpha_from_length(int(gamma), length))
    return {k: statistics.median(v) for k, v in sorted(per_budget.items())}


@dataclasses.dataclass(frozen=True)
class Prediction:
    quantity: str  # T_AR, T_D, T_V or speedup
    batch: int
    context: int
    setting: str
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def prediction_errors(model: cm.ModelSpec, hw: cm.Hardware, grid: Mapping[str, Any]) -> list[Prediction]:
    """Every measured quantity of a bench grid next to the model's prediction.

    The speedup is predicted for the cell's best setting with its measured accepted length, so it checks
    the step-cost model, not the acceptance.
    """
    out = []
    for cell in grid["cells"]:
        b, ctx = cell["batch"], cell["context"]
        t_ar = cm.t_target(model, hw, b, ctx)
        out.append(Prediction("T_AR", b, ctx, "", cell["T_AR"], t_ar))
        for key, measured in cell["T_D"].items():
            budget = int(key.split("/")[1])
            out.append(Prediction("T_D", b, ctx, key, measured, cm.t_draft(model, hw, b, budget, ctx)))
        for g, measured in cell["T_V"].items():
            out.append(
                Prediction("T_V", b, ctx, f"gamma {g}", measured, cm.t_verify(model, hw, b, ctx, int(g)))
            )
        g, budget = cell["gamma"], cell["budget"]
        t_sd = cm.t_sd(
            g,
            cm.t_draft(model, hw, b, budget, ctx),
            cm.t_verify(model, hw, b, ctx, g),
            cell["accepted_length"],
        )
        setting = f"{cell['draft']}/{budget}/gamma {g}"
        out.append(Prediction("speedup", b, ctx, setting, cell["speedup"], t_ar / t_sd))
    return out


def grid_samples(
    grid: Mapping[str, Any], cells: Sequence[tuple[int, int]] | None = None
) -> list[cm.StepSample]:
    """The grid's measured steps (every T_AR, T_D and T_V) of the (batch, context) ``cells`` (or all)."""
    out = []
    for cell in grid["cells"]:
        b, ctx = cell["batch"], cell["context"]
        if cells is not None and (b, ctx) not in cells:
            continue
        out.append(cm.StepSample("target", b, ctx, 1, cell["T_AR"]))
        for key, t in cell["T_D"].items():
            out.append(cm.StepSample("draft", b, min(int(key.split("/")[1]), ctx), 1, t))
        for g, t in cell["T_V"].items():
            out.append(cm.StepSample("verify", b, ctx, int(g) + 1, t))
    return out


def corner_cells(grid: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The smallest and largest batch at the shortest and longest context: a four-cell design."""
    batches = sorted({c["batch"] for c in grid["cells"]})
    contexts = sorted({c["context"] for c in grid["cells"]})
    return [(b, ctx) for b in {batches[0], batches[-1]} for ctx in {contexts[0], contexts[-1]}]


def held_out_errors(model: cm.ModelSpec, grid: Mapping[str, Any]) -> tuple[cm.Hardware, list[Prediction]]:
    """Fit on the grid's corner cells, predict the other cells: the model's own error, free of the drift in
    machine load between a calibration run and a grid run."""
    corners = corner_cells(grid)
    hw = cm.fit_hardware(model, grid_samples(grid, corners), "fitted on the grid's corner cells")
    rest = {"cells": [c for c in grid["cells"] if (c["batch"], c["context"]) not in corners]}
    return hw, prediction_errors(model, hw, rest)


def error_summary(predictions: Sequence[Prediction]) -> dict[str, float]:
    """Median absolute relative error per quantity, and over all."""
    by: dict[str, list[float]] = {}
    for p in predictions:
        by.setdefault(p.quantity, []).append(abs(p.error))
        by.setdefault("all", []).append(abs(p.error))
    return {q: statistics.median(v) for q, v in by.items()}


def calibration_table(calibration: Calibration) -> Table:
    hw = calibration.hardware
    table = Table(
        title=f"Calibrated rates ({len(calibration.samples)} measured steps, key {calibration.key})"
    )
    for col in ("bandwidth GB/s", "matmul GFLOP/s", "attention GFLOP/s", "overhead ms"):
        table.add_column(col, justify="right")

    def giga(rate: float) -> str:
        return "unresolved" if rate == float("inf") else f"{rate / 1e9:.1f}"

    table.add_row(
        giga(hw.bandwidth), giga(hw.peak_flops), giga(hw.attention_rate), f"{hw.overhead_s * MS:.2f}"
    )
    return table


def errors_table(predictions: Sequence[Prediction], title: str) -> Table:
    table = Table(title=title)
    for col in ("quantity", "batch", "context", "setting", "measured", "predicted", "error"):
        table.add_column(col, justify="right")
    for p in predictions:
        unit = (lambda v: f"{v:.2f}x") if p.quantity == "speedup" else (lambda v: f"{v * MS:.1f} ms")
        table.add_row(
            p.quantity,
            str(p.batch),
            str(p.context),
            p.setting,
            unit(p.measured),
            unit(p.predicted),
            f"{p.error:+.1%}",
        )
    return table


@dataclasses.dataclass
class CalibrationCheck:
    """A calibration and its errors: on its own steps, and (with a grid) on the grid's cells and held out."""

    calibration: Calibration
    fitted: list[Prediction]
    predictions: list[Prediction] | None = None
    held_out: list[Prediction] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"calibration": self.calibration.to_dict(), "fit_error": error_summary(self.fitted)}
        if self.predictions is not None:
            out["prediction_error"] = error_summary(self.predictions)
            out["predictions"] = [dataclasses.asdict(p) | {"error": p.error} for p in self.predictions]
            out["held_out_error"] = error_summary(self.held_out)
        return out


def check_calibration(
    engine,
    design: CalibrationDesign,
    grid: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CalibrationCheck:
    """Time ``design`` on ``engine``, fit and cache the rates, and measure their error.

    With a bench ``grid`` the cached calibration also takes the grid's acceptance curve (of its first cell's
    draft), and the check reports the error on the grid's cells and a fit held out on its corner cells.
    """
    fit = calibrate(engine, design, progress=progress)
    model = engine.artifact.spec
    fitted = [
        Prediction(
            s.phase,
            s.batch,
            s.kv_len,
            f"{s.tokens} token(s)",
            s.seconds,
            cm.predict_sample(model, fit.hardware, s),
        )
        for s in fit.samples
    ]
    if grid is None:
        return CalibrationCheck(fit, fitted)
    fit = dataclasses.replace(fit, acceptance=grid_acceptance(grid, grid["cells"][0]["draft"]))
    save(fit)
    _, held_out = held_out_errors(model, grid)
    return CalibrationCheck(fit, fitted, prediction_errors(model, fit.hardware, grid), held_out)
