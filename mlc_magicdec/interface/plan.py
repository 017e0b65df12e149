"""``plan``: predict whether speculation pays, with which gamma and budget (and ``--calibrate`` first)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..bench import calibrate as calibration_check
from ..bench import plan_report
from ..bench.roofline import this_cpu
from ..errors import UserError
from ..fileio import atomic_write_json
from ..runtime import calibration
from ..runtime import costmodel as cm
from ..runtime.engine import Engine
from .console import check_output_folder, results, status

DEFAULT_ALPHA = "0.85"  # the acceptance rate planned with when none is given or measured
US = 1e-6


@dataclasses.dataclass(frozen=True)
class PlanSpace:
    """What to plan for (batches, contexts) and over which settings (gammas, budgets: None for the acceptance
    curve's budgets, or the built-in ones), at which acceptance (a rate or ``budget:rate`` pairs)."""

    batches: Sequence[int]
    contexts: Sequence[int]
    gammas: Sequence[int]
    budgets: Sequence[int] | None = None
    alpha: str | None = None

    def __post_init__(self) -> None:
        if not self.batches or not self.contexts or not self.gammas or self.budgets == []:
            raise UserError("--batch, --context, --gamma and --budget need at least one value each")


@dataclasses.dataclass(frozen=True)
class DraftChoice:
    """The draft planned with: the target itself (``model`` None) or a smaller model, through a compressed
    or the full KV."""

    model: str | None = None
    compressed_kv: bool = True


@dataclasses.dataclass(frozen=True)
class Calibrate:
    """Plan with rates fitted to ``artifact``'s steps timed here (the quick design that gamma='auto' runs
    itself, or the full one), checked against a bench grid if given."""

    artifact: Path
    grid_path: Path | None = None
    quick: bool = False
    threads: int | None = None


def calibrate(request: Calibrate, quiet: bool = False) -> calibration_check.CalibrationCheck:
    """Time the artifact's steps here, fit and cache this machine's rates, and print their error (on the
    steps, and with a bench grid on its cells); ``quiet`` prints nothing."""
    grid = calibration_check.load_grid(request.grid_path) if request.grid_path is not None else None
    engine = Engine(request.artifact, threads=request.threads)
    design = calibration.QUICK_DESIGN if request.quick else calibration.FULL_DESIGN
    with status.status("timing steps") as progress:
        check = calibration_check.check_calibration(engine, design, grid, progress=progress.update)
    if quiet:
        return check
    results.print(calibration_check.calibration_table(check.calibration))
    results.print(
        calibration_check.errors_table(check.fitted, "Fit: the measured steps and the calibrated model")
    )
    if check.predictions is not None:
        summary = check.to_dict()
        results.print(
            calibration_check.errors_table(
                check.predictions, f"Prediction against the measured grid {request.grid_path}"
            )
        )
        results.print(
            "fitted on the grid's corner cells instead, median absolute error on the other cells: "
            + _errors(summary["held_out_error"])
        )
        results.print("median absolute error: " + _errors(summary["prediction_error"]))
    return check


def _errors(summary: dict[str, float]) -> str:
    return ", ".join(f"{quantity} {error:.1%}" for quantity, error in summary.items())


def plan(
    model: str | None,
    space: PlanSpace,
    *,
    hardware: str = "rtx4090",
    ideal: bool = False,
    overhead_us: float = 0.0,
    calibrated: Calibrate | None = None,
    draft: DraftChoice = DraftChoice(),
    dtype: str | None = None,
    json_out: str | Path | None = None,
    plot_path: Path | None = None,
) -> dict[str, Any]:
    """The best plan per (batch, context): T_T, T_D, T_V, speedup, gamma, budget and the critical length.

    ``model`` is an artifact, an HF config or a built-in name; ``hardware`` a preset (``cpu``: this machine,
    measured now) with its fitted fixed costs and efficiencies, or, with ``ideal``, the paper-style
    analysis of it (peak rates, no fixed costs); ``overhead_us`` is added per forward step. ``calibrated``
    instead fits the rates of its artifact (then the model is that artifact, its measured acceptance curve
    is used when ``space`` gives none, and the calibration goes into the JSON). Prints a table, or the JSON
    alone when ``json_out`` is ``"-"`` (with a path: the table, and the JSON written there).
    """
    for path in (json_out, plot_path):
        check_output_folder(path)
    check = None
    if calibrated is not None:
        if model is not None or ideal:
            raise UserError(
                "--calibrate plans for the artifact it times on its measured rates; leave out "
                "--model and --ideal"
            )
        check = calibrate(calibrated, quiet=json_out == "-")
        model, hw, mode = str(calibrated.artifact), check.calibration.hardware, plan_report.CALIBRATED
    elif model is None:
        raise UserError("give --model (or --calibrate ARTIFACT)")
    else:
        hw = cm.parse_hardware(hardware, this_cpu)
        hw, mode = plan_report.planning_mode(hw, ideal)
        hw = dataclasses.replace(hw, overhead_s=hw.overhead_s + overhead_us * US)
    spec = cm.load_model(model, dtype)
    measured = check.calibration.acceptance if check else None
    alpha = measured if space.alpha is None and measured else cm.parse_alpha(space.alpha or DEFAULT_ALPHA)
    draft_spec = cm.Draft(cm.load_model(draft.model, dtype) if draft.model else None, draft.compressed_kv)
    plans = [
        cm.best_plan(spec, hw, b, c, alpha, space.budgets, space.gammas, draft_spec)
        for b in space.batches
        for c in space.contexts
    ]
    predictions = {
        **(check.to_dict() if check else {}),
        **plan_report.plans_to_dict(spec, hw, draft_spec, alpha, plans, mode),
    }
    if json_out == "-":
        click.echo(json.dumps(predictions, indent=2))
    else:
        results.print(plan_report.plans_table(spec, hw, draft_spec, plans, mode))
        if json_out:
            atomic_write_json(Path(json_out), predictions)
    if plot_path:
        plan_report.plot_plans(
            spec, hw, draft_spec, alpha, plans, space.budgets, space.gammas, plot_path, mode
        )
    return predictions
