"""Calibration: fit the cost model's rates to steps measured on this machine, and check its predictions.

``calibrate`` times plain decode, draft and verify steps of an artifact over a small design of batch sizes
and contexts (on a zero-filled pool of its own, see ``magicdec.step_costs``) and fits the effective
bandwidth, matmul and attention FLOP/s and per-step overhead (``costmodel.fit_hardware``). The result is
cached per artifact, device and thread count, where ``gamma="auto"`` finds it. ``prediction_errors``
compares the calibrated model with a MagicDec bench grid (``mlc-magicdec bench --json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from ..compile.fetch import home
from . import costmodel as cm
from .magicdec import BenchConfig, step_costs

CALIBRATION_FORMAT = 1
INFINITE = "inf"  # an unresolved rate in the JSON file
CALIBRATION_DIR = "calibration"
MS = 1e3


@dataclasses.dataclass(frozen=True)
class CalibrationDesign:
    """The steps a calibration times: every (batch, context), one draft budget and one verify length."""

    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    budget: int
    gamma: int
    repeats: int


# QUICK runs in a few seconds, when ``gamma="auto"`` first meets an uncalibrated artifact; FULL is
# ``plan --calibrate`` and spans the bench grid's range.
QUICK_DESIGN = CalibrationDesign((1, 4), (512, 2048), 256, 3, 2)
FULL_DESIGN = CalibrationDesign((1, 4, 16), (1024, 4096, 8192), 256, 4, 3)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Fitted rates of one artifact on one machine, the steps they were fitted to, and, if known, the
    measured acceptance curve ``{budget: alpha}``."""

    key: str
    hardware: cm.Hardware
    samples: tuple[cm.StepSample, ...]
    acceptance: dict[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        hw = {k: _finite(v) for k, v in self.hardware.to_dict().items()}
        return {
            "format": CALIBRATION_FORMAT,
            "key": self.key,
            "hardware": hw,
            "samples": [s.to_dict() for s in self.samples],
            "acceptance": None
            if self.acceptance is None
            else {str(k): a for k, a in self.acceptance.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        hw = {k: (math.inf if v == INFINITE else v) for k, v in d["hardware"].items()}
        acceptance = d.get("acceptance")
        return cls(
            d["key"],
            cm.Hardware(**hw),
            tuple(cm.StepSample(**s) for s in d["samples"]),
            None if acceptance is None else {int(k): float(a) for k, a in acceptance.items()},
        )


def _finite(value: Any) -> Any:
    """JSON has no infinity: an unresolved (infinite) rate is stored as ``INFINITE``."""
    return INFINITE if isinstance(value, float) and math.isinf(value) else value


def calibration_key(artifact_config: Mapping[str, Any], threads: int) -> str:
    """Artifact library, device, CPU and thread count: what the fitted rates depend on."""
    parts = [
        artifact_config["hashes"]["library"],
        artifact_config["target"]["device"],
        platform.machine(),
        platform.processor() or "",
        str(threads),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def calibration_path(key: str) -> Path:
    return home() / CALIBRATION_DIR / f"{key}.json"


def model_spec(engine) -> cm.ModelSpec:
    """The cost model's view of an engine's target."""
    return cm.ModelSpec(engine.config, cm.DTYPE_BYTES[engine.artifact.dtype], engine.artifact.path.name)


def measure(
    engine, design: CalibrationDesign, progress: Callable[[str], None] | None = None
) -> list[cm.StepSample]:
    """Time plain, draft and verify steps over ``design`` on a pool of their own."""
    from ..runtime.engine import ModelRunner

    runner = ModelRunner(engine.artifact)
    window = engine.config.context_window
    cfg = BenchConfig(
        batches=design.batches,
        contexts=design.contexts,
        gammas=[design.gamma],
        drafts=["snapkv"],
        budgets=[design.budget],
        repeats=design.repeats,
    )
    samples = []
    try:
        for context in design.contexts:
            context = min(context, window - design.gamma - 1)
            for batch in design.batches:
                if progress:
                    progress(f"timing steps at batch {batch}, context {context}")
                costs = step_costs(runner, batch, context, cfg)
                samples += [
                    cm.StepSample("target", batch, context, 1, costs["T_AR"]),
                    cm.StepSample(
                        "draft",
                        batch,
                        min(design.budget, context),
                        1,
                        costs["T_D"][f"snapkv/{design.budget}"],
                    ),
                    cm.StepSample("verify", batch, context, design.gamma + 1, costs["T_V"][design.gamma]),
                ]
    finally:
        runner.pool_tensor = None
    return samples


def calibrate(
    engine,
    design: CalibrationDesign = FULL_DESIGN,
    acceptance: dict[int, float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Measure ``design`` on ``engine``'s artifact, fit the rates and cache the result."""
    key = calibration_key(engine.artifact.config, engine.threads)
    samples = measure(engine, design, progress)
    hw = cm.fit_hardware(
        model_spec(engine), samples, f"calibrated {engine.artifact.config['target']['device']}"
    )
    calibration = Calibration(key, hw, tuple(samples), acceptance)
    save(calibration)
    return calibration


def save(calibration: Calibration) -> Path:
    """Write to the cache (temporary file, then rename)."""
    path = calibration_path(calibration.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(calibration.to_dict(), indent=1))
    tmp.replace(path)
    return path


def load(key: str) -> Calibration | None:
    """The cached calibration for ``key``; None if there is none or it cannot be read."""
    path = calibration_path(key)
    try:
        d = json.loads(path.read_text())
        return Calibration.from_dict(d) if d.get("format") == CALIBRATION_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, cm.CostModelError):
        return None


def load_or_calibrate(engine) -> Calibration:
    """The cached calibration of ``engine``'s artifact on this machine, or a quick one made now."""
    cached = load(calibration_key(engine.artifact.config, engine.threads))
    return cached if cached is not None else calibrate(engine, QUICK_DESIGN)


# ------------------------------------------------------------------------------------------------------
# Against a measured grid


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
