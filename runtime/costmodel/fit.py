"""Fitting a hardware's effective rates to measured step times (non-negative least squares)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...compile.config import ModelConfig
from .hardware import GPU_FIT, CostModelError, Hardware
from .spec import ModelSpec, as_spec
from .steps import StepWork, _forward_time, collective_time, compute_time, memory_time, step_work

# ------------------------------------------------------------------------------------------------------
# Calibration: effective rates fitted to measured steps

PHASES = ("target", "draft", "verify")
NEGLIGIBLE_SHARE = 1e-9  # a fitted term below this share of every step's time is no term at all


@dataclasses.dataclass(frozen=True)
class StepSample:
    """One measured forward step: ``batch`` sequences, ``tokens`` new tokens each, ``kv_len`` KV entries
    read by each (the context for target and verify, the budget for a compressed draft)."""

    phase: str  # one of PHASES
    batch: int
    kv_len: int
    tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fit_relative(columns: np.ndarray, seconds: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Non-negative ``x`` with ``columns @ x + known ~ seconds``, least squares on relative error (so every
    sample counts alike whatever its size). A coefficient below ``NEGLIGIBLE_SHARE`` of every sample's time
    is zero."""
    from scipy.optimize import nnls

    known = np.zeros(len(seconds)) if known is None else known
    a = columns / seconds[:, None]
    scale = a.max(axis=0)  # columns of order one for a well-conditioned fit
    scale[scale == 0] = 1.0
    coef, _ = nnls(a / scale, 1.0 - known / seconds)
    coef[coef < NEGLIGIBLE_SHARE] = 0.0  # in scaled units: a term worth less than this share of any step
    return coef / scale


def _rate(per_unit: float) -> float:
    return 1.0 / per_unit if per_unit > 0 else math.inf


def fit_hardware(model: ModelSpec | ModelConfig, samples: Sequence[StepSample], name: str) -> Hardware:
    """The machine as the model sees it: effective bandwidth (dense, and through a compressed view), matmul
    and attention FLOP/s, and overhead.

    Fits ``T = overhead + bytes / bandwidth + sparse_bytes / sparse_bandwidth + matmul_flops / peak +
    attention_flops / attention_rate`` (no overlap, as measured on CPUs; draft samples read their KV through
    a compressed view) by non-negative least squares on relative error. A term the samples cannot resolve
    (its coefficient fits to zero) gets an infinite rate. One device: no launches or collectives apart from
    the overhead.
    """
    if len(samples) < 4:
        raise CostModelError(f"calibration needs at least 4 measured steps, got {len(samples)}")
    rows, seconds = [], []
    for s in samples:
        if s.seconds <= 0:
            raise CostModelError(f"measured step time must be positive, got {s.seconds}")
        w = step_work(model, s.batch, s.kv_len, s.tokens, sparse=s.phase == "draft")
        rows.append([w.steps, w.nbytes, w.sparse_bytes, w.matmul_flops, w.attention_flops])
        seconds.append(s.seconds)
    coef = _fit_relative(np.asarray(rows, dtype=float), np.asarray(seconds))
    overhead, per_byte, per_sparse_byte, per_flop, per_attention_flop = (float(c) for c in coef)
    return Hardware(
        name,
        _rate(per_byte),
        _rate(per_flop),
        overhead_s=overhead,
        attention_flops=_rate(per_attention_flop),
        overlap=False,
        sparse_bandwidth=_rate(per_sparse_byte),
    )


@dataclasses.dataclass(frozen=True)
class TimedWork:
    """Measured seconds of some work: one step, a draft round of several, or a whole speculation round."""

    work: StepWork
    seconds: float
    label: str = ""


GPU_TERMS = tuple(GPU_FIT)  # the terms fitted on measured GPU work, as the presets carry them


def fit_efficiencies(base: Hardware, timed: Sequence[TimedWork], name: str | None = None) -> Hardware:
    """``base`` with the four terms of ``GPU_TERMS`` fitted to measured work; its peaks and links kept.

    Fits ``T - collectives = memory_at_peak / f_bw + compute_at_peak / f_fl + kernels * launch_s + rounds
    * round_s`` (additive, collectives from ``base``'s link) by the same non-negative least squares on
    relative error as ``fit_hardware``. The work may come from several models (a target and its small
    draft). A term the data cannot resolve keeps ``base``'s value.
    """
    if len(timed) < len(GPU_TERMS):
        raise CostModelError(f"the fit needs at least {len(GPU_TERMS)} measurements, got {len(timed)}")
    peak = dataclasses.replace(base, bandwidth_efficiency=1.0, flops_efficiency=1.0, overlap=False)
    rows, seconds, known = [], [], []
    for t in timed:
        if t.seconds <= 0:
            raise CostModelError(f"measured time must be positive, got {t.seconds} ({t.label})")
        w = t.work
        rows.append([memory_time(peak, w), compute_time(peak, w), w.kernels, w.rounds])
        seconds.append(t.seconds)
        known.append(collective_time(base, w) + w.steps * base.overhead_s)
    coef = _fit_relative(np.asarray(rows, dtype=float), np.asarray(seconds), np.asarray(known))
    per_peak_byte, per_peak_flop, launch, per_round = (float(c) for c in coef)
    fitted = {
        "bandwidth_efficiency": 1.0 / per_peak_byte if per_peak_byte else base.bandwidth_efficiency,
        "flops_efficiency": 1.0 / per_peak_flop if per_peak_flop else base.flops_efficiency,
        "launch_s": launch or base.launch_s,
        "round_s": per_round or base.round_s,
    }
    return dataclasses.replace(base, name=name or base.name, overlap=False, **fitted)


def predict_sample(model: ModelSpec | ModelConfig, hw: Hardware, sample: StepSample) -> float:
    """The model's time for the step of ``sample`` (its measured seconds are ignored)."""
    m = as_spec(model)
    return _forward_time(m, hw, sample.batch, sample.kv_len, sample.tokens, sparse=sample.phase == "draft")
