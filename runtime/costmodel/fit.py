"""Fitting a hardware's effective rates to measured step times (non-negative least squares)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...compile.config import ModelConfig
from .hardware import CostModelError, Hardware
from .spec import ModelSpec, as_spec
from .steps import _forward_time, step_work

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


def fit_hardware(model: ModelSpec | ModelConfig, samples: Sequence[StepSample], name: str) -> Hardware:
    """The machine as the model sees it: effective bandwidth (dense, and through a compressed view), matmul
    and attention FLOP/s, and overhead.

    Fits ``T = overhead + bytes / bandwidth + sparse_bytes / sparse_bandwidth + matmul_flops / peak +
    attention_flops / attention_rate`` (no overlap, as measured on CPUs; draft samples read their KV through
    a compressed view) by non-negative least squares on relative error, so every sample
    counts alike whatever its size. A term the samples cannot resolve (its coefficient fits to zero) gets an
    infinite rate.
    """
    from scipy.optimize import nnls

    if len(samples) < 4:
        raise CostModelError(f"calibration needs at least 4 measured steps, got {len(samples)}")
    rows, target = [], []
    for s in samples:
        if s.seconds <= 0:
            raise CostModelError(f"measured step time must be positive, got {s.seconds}")
        w = step_work(model, s.batch, s.kv_len, s.tokens, sparse=s.phase == "draft")
        rows.append([1.0, w.nbytes, w.sparse_bytes, w.matmul_flops, w.attention_flops])
        target.append(s.seconds)
    a = np.asarray(rows) / np.asarray(target)[:, None]
    scale = a.max(axis=0)  # columns of order one for a well-conditioned fit
    scale[scale == 0] = 1.0
    coef, _ = nnls(a / scale, np.ones(len(samples)))
    coef[coef < NEGLIGIBLE_SHARE] = 0.0  # in scaled units: a term worth less than this share of any step
    overhead, per_byte, per_sparse_byte, per_flop, per_attention_flop = (float(c) for c in coef / scale)

    def rate(per_unit: float) -> float:
        return 1.0 / per_unit if per_unit > 0 else math.inf

    return Hardware(
        name,
        rate(per_byte),
        rate(per_flop),
        overhead_s=float(overhead),
        attention_flops=rate(per_attention_flop),
        overlap=False,
        sparse_bandwidth=rate(per_sparse_byte),
    )


def predict_sample(model: ModelSpec | ModelConfig, hw: Hardware, sample: StepSample) -> float:
    """The model's time for the step of ``sample`` (its measured seconds are ignored)."""
    m = as_spec(model)
    return _forward_time(m, hw, sample.batch, sample.kv_len, sample.tokens, sparse=sample.phase == "draft")
