"""Analytic (roofline) cost model of MagicDec speculative decoding.

Every step time is ``max(bytes / bandwidth, flops / peak) + overhead``: a decode step reads the weights once
for the whole batch and every sequence's KV cache, and does two FLOPs per weight per token plus four FLOPs
per KV entry per query head per token (``QK^T`` and ``PV``). With tensor parallelism over ``n`` devices the
weights, the KV cache and the FLOPs are split ``n`` ways, so bytes and FLOPs are divided by ``n``
(communication is not modelled; put it in ``Hardware.overhead_s``).

From the step times and an acceptance rate ``alpha`` (MagicDec, Chen et al. 2024, arXiv:2408.11049)::

    Omega(gamma, alpha) = (1 - alpha^(gamma+1)) / (1 - alpha)      expected tokens per iteration
    T_SD                = (gamma * T_D + T_V(gamma)) / Omega       time per generated token
    speedup             = T_T / T_SD
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ..compile.config import ModelConfig, ModelError
from ..compile.loaders import read_json
from ..constants import DTYPE_BYTES, KV_TENSORS
from ..errors import UserError
from ..manifest import CONFIG_NAME as ARTIFACT_CONFIG_NAME

HF_CONFIG_NAME = "config.json"
DEFAULT_DTYPE = "float16"
GB = 1e9
TFLOPS = 1e12
FLOPS_PER_MAC = 2  # a multiply-accumulate is two FLOPs
ATTENTION_FLOPS_PER_ENTRY = 2 * FLOPS_PER_MAC  # per query head and KV entry: one MAC in QK^T, one in PV
DEFAULT_GAMMAS = (1, 2, 3, 4, 5, 6)
DEFAULT_BUDGETS = (256, 512, 1024, 2048)
DEFAULT_MAX_LENGTH = 1 << 20  # search cap of the critical length when the model gives no context window


class CostModelError(UserError, ValueError):
    """Bad input to the cost model (unknown hardware, bad acceptance rate, ...); the message is one line."""


# ------------------------------------------------------------------------------------------------------
# Hardware


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator (``devices`` of them with tensor parallelism): per-device HBM bandwidth and peak.

    ``peak_flops`` is the dense (non-sparse) tensor-core rate of the dtype used; ``overhead_s`` is a fixed
    cost per forward step (kernel launches, synchronisation, all-reduces), not divided among devices.
    ``attention_flops`` is the rate of the attention FLOPs when it differs from ``peak_flops`` (a calibrated
    machine whose attention kernel runs at another rate than its matmuls). ``overlap``: memory traffic and
    compute overlap (the roofline's ``max``); a calibrated CPU adds them instead. ``sparse_bandwidth`` is
    the rate of KV reads through a draft's compressed view (a gather of scattered positions), when it
    differs from ``bandwidth``.
    """

    name: str
    bandwidth: float  # bytes/s, one device
    peak_flops: float  # FLOP/s, one device
    devices: int = 1
    overhead_s: float = 0.0
    attention_flops: float | None = None  # FLOP/s of attention, one device (None: peak_flops)
    overlap: bool = True
    memory: float | None = None  # bytes of device memory, one device (None: not checked)
    sparse_bandwidth: float | None = (
        None  # bytes/s of KV gathered through a compressed view (None: bandwidth)
    )

    def __post_init__(self) -> None:
        rates = (self.bandwidth, self.peak_flops, self.attention_rate, self.sparse_rate)
        if min(rates) <= 0 or self.devices < 1 or self.overhead_s < 0:
            raise CostModelError(
                f"hardware {self.name!r} needs positive bandwidth and FLOP/s, devices >= 1 and overhead >= 0"
            )

    @property
    def sparse_rate(self) -> float:
        """Bytes/s of KV read through a compressed view, one device."""
        return self.bandwidth if self.sparse_bandwidth is None else self.sparse_bandwidth

    @property
    def attention_rate(self) -> float:
        """FLOP/s of attention, one device."""
        return self.peak_flops if self.attention_flops is None else self.attention_flops

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which a step turns from bandwidth-bound to compute-bound."""
        return self.peak_flops / self.bandwidth

    def with_devices(self, devices: int) -> Hardware:
        """The same device, ``devices`` of them in tensor parallel."""
        name = self.name.split("x", 1)[1] if re.match(r"^\d+x", self.name) else self.name
        return dataclasses.replace(self, name=f"{devices}x{name}" if devices > 1 else name, devices=devices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Public spec sheets; FLOP/s are dense FP16 tensor-core rates with FP32 accumulate (no 2:4 sparsity).
#  - RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (v2.1), appendix table: 1008 GB/s GDDR6X,
#    165.2 TFLOPS FP16 tensor with FP32 accumulate (330.4 with sparsity).
#  - A100 80GB SXM: NVIDIA A100 datasheet: 2039 GB/s HBM2e, 312 TFLOPS FP16 tensor (624 with sparsity).
#  - H100 SXM: NVIDIA H100 datasheet: 3.35 TB/s HBM3, 1979 TFLOPS FP16 tensor with sparsity, so 989 dense.
#  - H200 SXM: NVIDIA H200 datasheet: 4.8 TB/s HBM3e, same tensor cores as H100 SXM (989 dense).
#  - M2 Max (38-core GPU): Apple M2 Pro/Max press release (Jan 2023): 400 GB/s unified memory; about
#    13.6 TFLOPS (FP32 ALUs; FP16 runs at the same rate on Apple GPUs).
#  - M3 Max (40-core GPU): Apple M3 family press release (Oct 2023): 400 GB/s; about 14.2 TFLOPS.
#  Memory: 24 GB (4090), 80 GB (A100 80GB, H100 SXM), 141 GB (H200); the largest unified memory the Macs
#  are sold with, 96 GB (M2 Max) and 128 GB (M3 Max), of which macOS lends the GPU most.
HARDWARE_PRESETS: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware("rtx4090", 1008 * GB, 165.2 * TFLOPS, memory=24 * GB),
        Hardware("a100-80gb", 2039 * GB, 312 * TFLOPS, memory=80 * GB),
        Hardware("h100-sxm", 3350 * GB, 989 * TFLOPS, memory=80 * GB),
        Hardware("h200", 4800 * GB, 989 * TFLOPS, memory=141 * GB),
        Hardware("m2-max", 400 * GB, 13.6 * TFLOPS, memory=96 * GB),
        Hardware("m3-max", 400 * GB, 14.2 * TFLOPS, memory=128 * GB),
    )
}
HARDWARE_ALIASES = {
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
    "a100": "a100-80gb",
    "a100-80g": "a100-80gb",
    "h100": "h100-sxm",
    "h200-sxm": "h200",
    "m2max": "m2-max",
    "m3max": "m3-max",
}
_TP_PREFIX = re.compile(r"^(\d+)\s*[x*]\s*(.+)$")


MEASURED_CPU = "cpu"


def parse_hardware(spec: str, measure_cpu: Callable[[], Hardware] | None = None) -> Hardware:
    """``"rtx4090"``, ``"8xA100"``, ``"8xh100"``: a preset (case-insensitive), ``Nx`` = N devices in TP;
    ``"cpu"``: this machine's CPU, measured on the spot by ``measure_cpu`` (``bench.roofline.this_cpu``)."""
    text = spec.strip().lower().replace("_", "-").replace(" ", "")
    if text == MEASURED_CPU:
        if measure_cpu is None:
            raise CostModelError(f"hardware {spec!r} is measured on the spot: use `mlc-magicdec plan`")
        return measure_cpu()
    devices = 1
    m = _TP_PREFIX.match(text)
    if m:
        devices, text = int(m.group(1)), m.group(2)
        if devices < 1:
            raise CostModelError(f"hardware {spec!r}: the device count must be at least 1")
    hw = HARDWARE_PRESETS.get(HARDWARE_ALIASES.get(text, text))
    if hw is None:
        raise CostModelError(
            f"unknown hardware {spec!r}; choose from {', '.join(HARDWARE_PRESETS)} (prefix Nx for N devices) "
            f"or {MEASURED_CPU} (measured here)"
        )
    return hw.with_devices(devices)


# ------------------------------------------------------------------------------------------------------
# Model sizes


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model's architecture, the bytes per weight and KV element, and a display name."""

    config: ModelConfig
    dtype_bytes: int = DTYPE_BYTES[DEFAULT_DTYPE]
    name: str = "model"

    @property
    def param_count(self) -> int:
        """All parameters: embedding + layers (qkv bias included) + final norm + lm_head unless tied."""
        c = self.config
        embedding = c.vocab_size * c.hidden_size
        return embedding + self._body_params + (0 if c.tie_word_embeddings else embedding)

    @property
    def step_param_count(self) -> int:
        """Parameters read (and multiplied) by each decode step: all but an untied input embedding table.

        A token's embedding is a lookup of one row, so the untied table costs neither bandwidth nor FLOPs;
        a tied table is read in full as the lm_head.
        """
        return self._body_params + self.config.vocab_size * self.config.hidden_size

    @property
    def _body_params(self) -> int:
        """Decoder layers plus the final norm."""
        c = self.config
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        attention = c.hidden_size * (q_dim + 2 * kv_dim) + q_dim * c.hidden_size
        bias = q_dim + 2 * kv_dim if c.qkv_bias else 0
        mlp = 3 * c.hidden_size * c.intermediate_size  # gate, up, down
        norms = 2 * c.hidden_size
        return c.num_layers * (attention + bias + mlp + norms) + c.hidden_size

    @property
    def weight_bytes(self) -> int:
        """``W``: bytes of weights one decode step reads."""
        return self.step_param_count * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """``2 * layers * kv_heads * head_dim * dtype_bytes``: K and V of one token, all layers."""
        c = self.config
        return KV_TENSORS * c.num_layers * c.num_kv_heads * c.head_dim * self.dtype_bytes

    @property
    def attention_flops_per_entry(self) -> int:
        """``4 * layers * heads * head_dim``: attention FLOPs of one query token over one KV position."""
        c = self.config
        return ATTENTION_FLOPS_PER_ENTRY * c.num_layers * c.num_heads * c.head_dim

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.config.family,
            "dtype_bytes": self.dtype_bytes,
            "params": self.param_count,
            "step_params": self.step_param_count,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "context_window": self.config.context_window,
        }


def as_spec(model: ModelSpec | ModelConfig) -> ModelSpec:
    """A ``ModelSpec``; a bare ``ModelConfig`` is taken to be float16."""
    return model if isinstance(model, ModelSpec) else ModelSpec(model)


@dataclasses.dataclass(frozen=True)
class Draft:
    """How drafting is done: the target's own weights (``model=None``, self-speculation) or a small model.

    ``compressed``: the draft attends to a budget of ``K`` KV entries (StreamingLLM, SnapKV); otherwise to
    its full KV cache of ``L`` entries.
    """

    model: ModelSpec | None = None
    compressed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.name if self.model else "self", "compressed": self.compressed}


SELF_DRAFT = Draft()


# ------------------------------------------------------------------------------------------------------
# Roofline step times


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise CostModelError(f"{name} must be at least 1, got {v}")


def step_time(
    hw: Hardware, nbytes: float, flops: float, attention_flops: float = 0.0, sparse_bytes: float = 0.0
) -> float:
    """``max(bytes / (n * bandwidth), flops / (n * peak)) + overhead`` for ``n = hw.devices``.

    ``flops`` are the matmul FLOPs and ``attention_flops`` those of attention (at ``hw.attention_rate``);
    ``sparse_bytes`` are KV bytes gathered through a compressed view (at ``hw.sparse_rate``).
    Without ``hw.overlap`` the memory and compute times are added instead of taking their maximum.
    """
    n = hw.devices
    memory = nbytes / (n * hw.bandwidth) + sparse_bytes / (n * hw.sparse_rate)
    compute = flops / (n * hw.peak_flops) + attention_flops / (n * hw.attention_rate)
    return (max(memory, compute) if hw.overlap else memory + compute) + hw.overhead_s


@dataclasses.dataclass(frozen=True)
class StepWork:
    """What one forward step does: bytes read (the KV's, densely or through a compressed view), matmul
    FLOPs and attention FLOPs."""

    nbytes: float
    matmul_flops: float
    attention_flops: float
    sparse_bytes: float = 0.0


def step_work(
    model: ModelSpec | ModelConfig, batch: int, kv_len: int, tokens: int, sparse: bool = False
) -> StepWork:
    """One forward of ``tokens`` new tokens for each of ``batch`` sequences that attend to ``kv_len``.

    ``bytes = W + B * KV(kv_len)``, ``matmul = B * tokens * 2 * P`` and
    ``attention = B * tokens * 4 * layers * heads * head_dim * kv_len``. With ``sparse`` the KV bytes are
    gathered through a compressed view and counted apart.
    """
    m = as_spec(model)
    kv = batch * m.kv_bytes_per_token * kv_len
    return StepWork(
        m.weight_bytes + (0 if sparse else kv),
        batch * tokens * FLOPS_PER_MAC * m.step_param_count,
        batch * tokens * m.attention_flops_per_entry * kv_len,
        kv if sparse else 0.0,
    )


def _forward_time(
    m: ModelSpec, hw: Hardware, batch: int, kv_len: int, tokens: int, sparse: bool = False
) -> float:
    w = step_work(m, batch, kv_len, tokens, sparse)
    return step_time(hw, w.nbytes, w.matmul_flops, w.attention_flops, w.sparse_bytes)


def memory_needed(model: ModelSpec | ModelConfig, batch: int, context: int) -> float:
    """Bytes of weights (all parameters) and of ``batch`` sequences' KV at ``context``, all devices."""
    m = as_spec(model)
    return m.param_count * m.dtype_bytes + batch * m.kv_bytes_per_token * context


def fits(model: ModelSpec | ModelConfig, hw: Hardware, batch: int, context: int) -> bool | None:
    """Whether weights and KV fit in the devices' memory (split ``hw.devices`` ways); None if unknown."""
    if hw.memory is None:
        return None
    return memory_needed(model, batch, context) <= hw.devices * hw.memory


def t_target(model: ModelSpec | ModelConfig, hw: Hardware, batch: int, context: int) -> float:
    """``T_T(B, L)``: one plain decode step of the target.

    ``bytes = W + B * KV(L)``, ``flops = B * (2 * P + 4 * layers * heads * head_dim * L)`` where ``W`` and
    ``P`` are the weight bytes and parameters read per step and ``KV(L) = kv_bytes_per_token * L``.
    """
    _check_positive(batch=batch, context=context)
    return _forward_time(as_spec(model), hw, batch, context, 1)


def t_verify(model: ModelSpec | ModelConfig, hw: Hardware, batch: int, context: int, gamma: int) -> float:
    """``T_V(B, L, gamma)``: one target forward over ``gamma + 1`` tokens per sequence.

    Bytes as ``T_T`` (weights and KV are read once for all ``gamma + 1`` tokens; their own new KV is
    negligible), flops ``(gamma + 1)`` times those of ``T_T``.
    """
    _check_positive(batch=batch, context=context, tokens=gamma + 1)
    return _forward_time(as_spec(model), hw, batch, context, gamma + 1)


def t_draft(
    model: ModelSpec | ModelConfig,
    hw: Hardware,
    batch: int,
    budget: int,
    context: int | None = None,
    draft: Draft = SELF_DRAFT,
) -> float:
    """``T_D(B, K)``: one draft step (one new token per sequence).

    The drafting model is ``draft.model`` or, for self-speculation, the target. It reads its weights and
    ``kv_len`` KV entries per sequence: ``bytes = W_d + B * KV_d(kv_len)``,
    ``flops = B * (2 * P_d + 4 * layers_d * heads_d * head_dim_d * kv_len)``, with ``kv_len = min(K, L)``
    for a compressed view (a budget beyond the context reads the context) and ``kv_len = L`` for a full KV.
    The up to ``gamma`` draft tokens appended to the view are negligible next to ``K`` and left out.
    """
    m = draft.model or as_spec(model)
    if draft.compressed:
        _check_positive(batch=batch, budget=budget)
        kv_len = budget if context is None else min(budget, context)
    else:
        if context is None:
            raise CostModelError("a draft with a full KV cache needs the context length")
        _check_positive(batch=batch, context=context)
        kv_len = context
    return _forward_time(m, hw, batch, kv_len, 1, sparse=draft.compressed)


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


# ------------------------------------------------------------------------------------------------------
# Speculation arithmetic


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise CostModelError(f"acceptance rate must be within [0, 1], got {alpha}")


def omega(gamma: int, alpha: float) -> float:
    """``Omega = (1 - alpha^(gamma+1)) / (1 - alpha)``: expected tokens per iteration, bonus included.

    Summed as ``1 + alpha + ... + alpha^gamma``: the same value, exact at ``alpha = 1`` (``gamma + 1``) and
    continuous near it (no cancellation in ``1 - alpha``).
    """
    _check_alpha(alpha)
    if gamma < 0:
        raise CostModelError(f"gamma must be at least 0, got {gamma}")
    return math.fsum(alpha**i for i in range(gamma + 1))


def t_sd(gamma: int, t_d: float, t_v: float, accepted_length: float) -> float:
    """``T_SD = (gamma * T_D + T_V) / accepted_length``: time per generated token with speculation."""
    if accepted_length <= 0:
        raise CostModelError(f"accepted length must be positive, got {accepted_length}")
    return (gamma * t_d + t_v) / accepted_length


def speedup(
    model: ModelSpec | ModelConfig,
    hw: Hardware,
    batch: int,
    context: int,
    gamma: int,
    alpha: float,
    budget: int,
    draft: Draft = SELF_DRAFT,
) -> float:
    """``T_T / T_SD`` with ``accepted_length = Omega(gamma, alpha)``."""
    tt = t_target(model, hw, batch, context)
    td = t_draft(model, hw, batch, budget, context, draft)
    tv = t_verify(model, hw, batch, context, gamma)
    return tt / t_sd(gamma, td, tv, omega(gamma, alpha))


def _best_speedup(model, hw, batch, context, gammas, alpha, budget, draft) -> float:
    return max(speedup(model, hw, batch, context, g, alpha, budget, draft) for g in gammas)


def critical_sequence_length(
    model: ModelSpec | ModelConfig,
    hw: Hardware,
    batch: int,
    alpha: float,
    gamma: int | None = None,
    budget: int = DEFAULT_BUDGETS[0],
    draft: Draft = SELF_DRAFT,
    gammas: Sequence[int] = DEFAULT_GAMMAS,
    max_length: int | None = None,
) -> int | None:
    """Smallest context ``L`` with ``speedup > 1`` (at ``gamma``, or the best of ``gammas``); None if never.

    Powers of two up to ``max_length`` (default: the model's context window) find the first length with a
    speedup; bisection between it and the power below finds the exact length (the speedup rises with
    ``L``: ``T_T`` and ``T_V`` grow with ``L`` at the same rate while ``T_D`` does not).
    """
    m = as_spec(model)
    _check_alpha(alpha)
    cap = max_length or m.config.context_window or DEFAULT_MAX_LENGTH
    gs = [gamma] if gamma is not None else list(gammas)

    def wins(length: int) -> bool:
        return _best_speedup(m, hw, batch, length, gs, alpha, budget, draft) > 1.0

    prev, length = 0, 1
    while True:
        if wins(length):
            break
        if length >= cap:
            return None
        prev, length = length, min(2 * length, cap)
    lo, hi = prev, length  # lo fails (or is 0), hi wins
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if wins(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------------------------------------------
# Acceptance curves and planning

AlphaSource = float | Mapping[int, float] | Callable[[int], float]


def acceptance_curve(points: Mapping[int, float]) -> Callable[[int], float]:
    """``K -> alpha`` through measured points: linear in ``log2 K`` between them, an error outside."""
    if not points:
        raise CostModelError("the acceptance curve has no points")
    for k, a in points.items():
        _check_positive(budget=k)
        _check_alpha(a)
    ks = sorted(points)

    def alpha_at(budget: int) -> float:
        if budget in points:
            return points[budget]
        if not ks[0] < budget < ks[-1]:
            raise CostModelError(
                f"budget {budget} is outside the measured acceptance curve ({ks[0]} to {ks[-1]})"
            )
        i = bisect.bisect(ks, budget)
        k0, k1 = ks[i - 1], ks[i]
        w = (math.log2(budget) - math.log2(k0)) / (math.log2(k1) - math.log2(k0))
        return points[k0] + w * (points[k1] - points[k0])

    return alpha_at


def alpha_function(source: AlphaSource) -> Callable[[int], float]:
    """A ``K -> alpha`` callable from a constant, a measured ``{K: alpha}`` curve, or a callable."""
    if isinstance(source, Mapping):
        return acceptance_curve(source)
    if callable(source):
        return source
    _check_alpha(float(source))
    return lambda _budget: float(source)


def parse_alpha(text: str) -> float | dict[int, float]:
    """``"0.85"`` -> 0.85; ``"256:0.8,512:0.85"`` -> ``{256: 0.8, 512: 0.85}`` (a measured curve)."""
    try:
        if ":" not in text:
            value = float(text)
            _check_alpha(value)
            return value
        curve: dict[int, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            k, a = part.split(":")
            curve[int(k)] = float(a)
    except ValueError as e:
        if isinstance(e, CostModelError):
            raise
        raise CostModelError(
            f"bad --alpha {text!r}; give a rate like 0.85 or budget:rate pairs like 256:0.8,512:0.85"
        ) from None
    acceptance_curve(curve)  # validates
    return curve


@dataclasses.dataclass(frozen=True)
class Plan:
    """The predicted best MagicDec setting for one (batch, context); times in seconds.

    ``t_verify`` and ``speedups`` are per gamma, at the best budget; ``critical_length`` is that of this
    batch at the best budget and the best gamma at each length.
    """

    batch: int
    context: int
    t_target: float
    budget: int
    alpha: float
    t_draft: float
    t_verify: dict[int, float]
    speedups: dict[int, float]
    gamma: int
    speedup: float
    critical_length: int | None
    fits: bool | None = None  # weights and KV fit in the devices' memory (None: memory unknown)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["t_verify"] = {str(g): t for g, t in self.t_verify.items()}
        d["speedups"] = {str(g): s for g, s in self.speedups.items()}
        return d


def best_plan(
    model: ModelSpec | ModelConfig,
    hw: Hardware,
    batch: int,
    context: int,
    alpha_of_budget: AlphaSource,
    budgets: Iterable[int] | None = None,
    gammas: Iterable[int] = DEFAULT_GAMMAS,
    draft: Draft = SELF_DRAFT,
    with_critical_length: bool = True,
) -> Plan:
    """The (gamma, budget) with the highest predicted speedup at this batch and context.

    ``alpha_of_budget``: a constant rate, a measured ``{K: alpha}`` curve or a callable ``K -> alpha``.
    ``budgets`` defaults to the curve's points, or ``DEFAULT_BUDGETS`` for a constant or callable.
    """
    m = as_spec(model)
    alpha_at = alpha_function(alpha_of_budget)
    if budgets is None:
        budgets = sorted(alpha_of_budget) if isinstance(alpha_of_budget, Mapping) else DEFAULT_BUDGETS
    budgets, gammas = list(budgets), list(gammas)
    if not budgets or not gammas:
        raise CostModelError("give at least one budget and one gamma")
    for g in gammas:
        _check_positive(gamma=g)
    tt = t_target(m, hw, batch, context)
    tv = {g: t_verify(m, hw, batch, context, g) for g in gammas}
    best: tuple[float, int, int] | None = None  # (speedup, budget, gamma)
    for k in budgets:
        alpha = alpha_at(k)
        _check_alpha(alpha)
        td = t_draft(m, hw, batch, k, context, draft)
        for g in gammas:
            s = tt / t_sd(g, td, tv[g], omega(g, alpha))
            if best is None or s > best[0]:
                best = (s, k, g)
    assert best is not None
    s, k, g = best
    alpha = alpha_at(k)
    td = t_draft(m, hw, batch, k, context, draft)
    speedups = {gg: tt / t_sd(gg, td, tv[gg], omega(gg, alpha)) for gg in gammas}
    critical = (
        critical_sequence_length(m, hw, batch, alpha, budget=k, draft=draft, gammas=gammas)
        if with_critical_length
        else None
    )
    return Plan(batch, context, tt, k, alpha, td, tv, speedups, g, s, critical, fits(m, hw, batch, context))


# ------------------------------------------------------------------------------------------------------
# Loading models

LLAMA_3_1_8B = ModelConfig(
    family="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    context_window=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
)
LLAMA_3_2_1B = dataclasses.replace(
    LLAMA_3_1_8B,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    head_dim=64,
    rope_scaling={**(LLAMA_3_1_8B.rope_scaling or {}), "factor": 32.0},
    tie_word_embeddings=True,
)
BUILTIN_MODELS = {"llama-3.1-8b": LLAMA_3_1_8B, "llama-3.2-1b": LLAMA_3_2_1B}


def _dtype_bytes(dtype: str | None, where: Path) -> int:
    dtype = dtype or DEFAULT_DTYPE
    if dtype not in DTYPE_BYTES:
        raise CostModelError(f"{where}: unsupported dtype {dtype!r}; supported: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def load_model(spec: str, dtype: str | None = None) -> ModelSpec:
    """A built-in name (``llama-3.1-8b``, ``llama-3.2-1b``), an artifact folder, or an HF config.json.

    The dtype is ``dtype`` if given, else the artifact's, else the config's ``torch_dtype``, else float16.
    """
    if spec.strip().lower() in BUILTIN_MODELS:
        name = spec.strip().lower()
        return ModelSpec(BUILTIN_MODELS[name], _dtype_bytes(dtype, Path(name)), name)
    path = Path(spec)
    if path.is_dir() and (path / ARTIFACT_CONFIG_NAME).is_file():
        cfg = read_json(path / ARTIFACT_CONFIG_NAME)
        try:
            config = ModelConfig.from_dict(cfg["model"])
        except (KeyError, TypeError) as e:
            raise CostModelError(f"{path / ARTIFACT_CONFIG_NAME} is corrupt ({e}); compile again") from None
        return ModelSpec(config, _dtype_bytes(dtype or cfg.get("dtype"), path), path.name)
    file = path / HF_CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise CostModelError(
            f"no model at {spec!r}; give an artifact folder, a config.json (or its folder), "
            f"or one of {', '.join(BUILTIN_MODELS)}"
        )
    cfg = read_json(file)
    try:
        config = ModelConfig.from_hf(cfg)
    except ModelError as e:
        raise CostModelError(f"{file}: {e}") from None
    name = path.name if path.is_dir() else file.parent.name or file.name
    return ModelSpec(config, _dtype_bytes(dtype or cfg.get("torch_dtype"), file), name)


# ------------------------------------------------------------------------------------------------------
# Reports

MS = 1e3  # seconds -> milliseconds
PLOT_POINTS = 48  # contexts per speedup curve


def plans_to_dict(
    model: ModelSpec, hw: Hardware, draft: Draft, alpha: AlphaSource, plans: Sequence[Plan]
) -> dict[str, Any]:
    """Everything ``plan --json`` prints: the model, hardware, draft, acceptance and one plan per cell."""
    if isinstance(alpha, Mapping):
        alpha_out: Any = {str(k): a for k, a in alpha.items()}
    else:
        alpha_out = alpha if isinstance(alpha, float) else repr(alpha)
    return {
        "model": model.to_dict(),
        "hardware": hw.to_dict(),
        "draft": draft.to_dict(),
        "alpha": alpha_out,
        "plans": [p.to_dict() for p in plans],
    }


def plans_table(model: ModelSpec, hw: Hardware, draft: Draft, plans: Sequence[Plan]) -> Table:
    """One row per (batch, context): times in ms, speedup per gamma, best setting, critical length."""
    gammas = list(plans[0].speedups) if plans else []
    drafter = (
        f"{draft.model.name if draft.model else 'self'}, {'compressed' if draft.compressed else 'full'} KV"
    )
    table = Table(
        title=(
            f"MagicDec roofline: {model.name} ({model.param_count / 1e9:.2f}B params, "
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
    ax.set_title(f"MagicDec roofline: {model.name} on {hw.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
