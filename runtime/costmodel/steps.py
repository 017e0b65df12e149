"""Roofline step times: target, draft and verify steps of a model on a hardware preset."""

from __future__ import annotations

import dataclasses

from ...compile.config import ModelConfig
from .hardware import FLOPS_PER_MAC, CostModelError, Hardware
from .spec import SELF_DRAFT, Draft, ModelSpec, as_spec

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
