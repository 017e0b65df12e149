"""Calibration: fit the cost model's rates to steps measured on this machine.

``calibrate`` times plain decode, draft and verify steps of an artifact over a small design of batch sizes
and contexts (on a zero-filled pool of its own, see ``steptiming.step_costs``) and fits the effective
bandwidth, matmul and attention FLOP/s and per-step overhead (``costmodel.fit_hardware``). The result is
cached per artifact, device and thread count, where ``gamma="auto"`` finds it. ``bench/calibrate.py``
checks a calibration against a MagicDec bench grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..compile.fetch import home
from ..fileio import atomic_write_json
from ..manifest import Manifest
from . import costmodel as cm
from .runner import ModelRunner
from .steptiming import step_costs

CALIBRATION_FORMAT = 2  # 2: draft steps at two budgets, through SnapKV-like clustered views
INFINITE = "inf"  # an unresolved rate in the JSON file
CALIBRATION_DIR = "calibration"


@dataclasses.dataclass(frozen=True)
class CalibrationDesign:
    """The steps a calibration times: every (batch, context), draft steps at each budget (two budgets
    separate the KV gathered through the view from the rest of a draft step) and one verify length."""

    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    budgets: tuple[int, ...]
    gamma: int
    repeats: int


# QUICK runs in a few seconds, when ``gamma="auto"`` first meets an uncalibrated artifact; its long context
# lets the fit see the attention arithmetic that makes a verify step dearer than a decode step where it is
# compute-bound (CPUs with an fp16 KV cache). FULL is ``plan --calibrate`` and spans the bench grid's range.
QUICK_DESIGN = CalibrationDesign((1, 4), (512, 4096), (128, 512), 3, 2)
FULL_DESIGN = CalibrationDesign((1, 4, 16), (1024, 4096, 8192), (256, 1024), 4, 3)


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


def calibration_key(artifact_config: Manifest, threads: int) -> str:
    """Artifact library, device, CPU and thread count: what the fitted rates depend on."""
    parts = [
        artifact_config.hashes["library"],
        artifact_config.device,
        platform.machine(),
        platform.processor() or "",
        str(threads),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def calibration_path(key: str) -> Path:
    return home() / CALIBRATION_DIR / f"{key}.json"


def measure(
    engine, design: CalibrationDesign, progress: Callable[[str], None] | None = None
) -> list[cm.StepSample]:
    """Time plain, draft and verify steps over ``design`` on a pool of their own."""

    runner = ModelRunner(engine.artifact)
    window = engine.config.context_window
    samples = []
    try:
        for context in design.contexts:
            context = min(context, window - design.gamma - 1)
            for batch in design.batches:
                if progress:
                    progress(f"timing steps at batch {batch}, context {context}")
                costs = step_costs(
                    runner, batch, context, [design.gamma], ["snapkv"], design.budgets, design.repeats
                )
                samples += [
                    cm.StepSample("target", batch, context, 1, costs["T_AR"]),
                    *(
                        cm.StepSample("draft", batch, min(k, context), 1, costs["T_D"][f"snapkv/{k}"])
                        for k in design.budgets
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
        engine.artifact.spec, samples, f"calibrated {engine.artifact.config.device}"
    )
    calibration = Calibration(key, hw, tuple(samples), acceptance)
    save(calibration)
    return calibration


def save(calibration: Calibration) -> Path:
    """Write to the cache (temporary file, then rename)."""
    path = calibration_path(calibration.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, calibration.to_dict(), indent=1)
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
