"""``plan``: will speculation pay on this hardware, at this batch and context, with which gamma and budget?"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .options import batch_context_options, budget_option, gamma_option, one_line_errors


@click.command("plan")
@click.option(
    "--model",
    default=None,
    help="Artifact folder, HF config.json (or its folder), or a built-in: llama-3.1-8b, llama-3.2-1b.",
)
@click.option(
    "--calibrate",
    "calibrate_artifact",
    type=click.Path(path_type=Path),
    default=None,
    help="Time steps of this artifact here, fit this machine's rates, and plan with them (and cache them "
    "for gamma='auto').",
)
@click.option(
    "--against",
    "grid_path",
    type=click.Path(path_type=Path),
    default=None,
    help="With --calibrate: a MagicDec bench grid (bench grid --json) to report the prediction error "
    "against.",
)
@click.option(
    "--quick", is_flag=True, help="With --calibrate: the few-second design that gamma='auto' runs itself."
)
@click.option("--threads", type=int, default=None, help="With --calibrate: CPU threads (default: all).")
@click.option(
    "--hardware",
    default="rtx4090",
    show_default=True,
    help="rtx4090, a100-80gb, h100-sxm, h200, m2-max, m3-max; prefix Nx for N devices (8xA100); cpu: this "
    "machine's CPU, its bandwidth and FLOP/s measured now.",
)
@click.option(
    "--ideal",
    is_flag=True,
    help="The paper-style analysis: peak bandwidth and FLOP/s, no launches, all-reduces or round costs "
    "[default: realistic, the preset's fitted terms].",
)
@batch_context_options("1,8,64", "4096,32768")
@click.option(
    "--alpha",
    default=None,
    help="Acceptance rate, or a measured curve of budget:rate pairs (256:0.8,512:0.85,1024:0.9) "
    "[default: the curve --calibrate --against measured, else 0.85].",
)
@budget_option(None)
@gamma_option("1,2,3,4,5,6")
@click.option("--dtype", default=None, help="Weight and KV dtype (default: the artifact's, else float16).")
@click.option("--draft-model", default=None, help="A smaller draft model (same forms as --model).")
@click.option(
    "--draft-kv",
    type=click.Choice(["compressed", "full"]),
    default="compressed",
    show_default=True,
    help="Whether the draft attends to a budget of KV entries or to all.",
)
@click.option(
    "--overhead-us",
    type=float,
    default=0.0,
    show_default=True,
    help="Extra fixed cost per forward step in microseconds, on top of the preset's own.",
)
@click.option(
    "--json",
    "json_out",
    is_flag=False,
    flag_value="-",
    default=None,
    metavar="[FILE]",
    help="Alone: print the predictions as JSON instead of tables. With FILE: print the tables and write the "
    "JSON there.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG of predicted speedup against context, one line per batch size.",
)
@one_line_errors
def plan_cmd(
    model: str | None,
    calibrate_artifact: Path | None,
    grid_path: Path | None,
    quick: bool,
    threads: int | None,
    draft_model: str | None,
    draft_kv: str,
    **options,
) -> None:
    """Predict T_T, T_D, T_V, speedup, the best gamma and budget, and the critical length."""
    from ..interface import plan

    calibrated = None
    if calibrate_artifact is not None:
        calibrated = plan.Calibrate(calibrate_artifact, grid_path=grid_path, quick=quick, threads=threads)
    elif grid_path is not None or quick or threads is not None:
        raise UserError("--against, --quick and --threads go with --calibrate ARTIFACT")
    space = plan.PlanSpace(
        **{k: options.pop(k) for k in ("batches", "contexts", "gammas", "budgets", "alpha")}
    )
    draft = plan.DraftChoice(draft_model, compressed_kv=draft_kv == "compressed")
    plan.plan(model, space, calibrated=calibrated, draft=draft, **options)
