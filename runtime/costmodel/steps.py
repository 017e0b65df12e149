"""Step times: target, draft and verify steps of a model on a hardware preset (roofline + fixed costs)."""

from __future__ import annotations

import dataclasses

from ...compile.config import ModelConfig
from .hardware import COLLECTIVE_BASE_S, FLOPS_PER_MAC, CostModelError, Hardware
from .spec import SELF_DRAFT, Draft, ModelSpec, as_spec

# ------------------------------------------------------------------------------------------------------
# Step times


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise CostModelError(f"{name} must be at least 1, got {v}")


@dataclasses.dataclass(frozen=True)
class StepWork:
    """What forward steps do, summed over all devices: bytes read (the KV's, densely or through a compressed
    view), matmul and attention FLOPs, and the fixed-cost events (steps, kernel launches, tensor-parallel
    all-reduces and all-gathers with the bytes they carry, speculation rounds). Works add, and an integer
    times a work repeats it."""

    nbytes: float
    matmul_flops: float
    attention_flops: float
    sparse_bytes: float = 0.0
    steps: int = 1
    kernels: int = 0
    allreduces: int = 0
    allreduce_bytes: float = 0.0
    gathers: int = 0
    gather_bytes: float = 0.0
    rounds: int = 0

    def __add__(self, other: StepWork) -> StepWork:
        return StepWork(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __rmul__(self, times: int) -> StepWork:
        return StepWork(*(times * a for a in dataclasses.astuple(self)))

    def with_round(self) -> StepWork:
        """This work as one speculation round (it pays the per-round cost once)."""
        return dataclasses.replace(self, rounds=self.rounds + 1)


def step_work(
    model: ModelSpec | ModelConfig, batch: int, kv_len: int, tokens: int, sparse: bool = False
) -> StepWork:
    """One forward of ``tokens`` new tokens for each of ``batch`` sequences that attend to ``kv_len``.

    ``bytes = W + B * KV(kv_len)``, ``matmul = B * tokens * 2 * P`` and
    ``attention = B * tokens * 4 * layers * heads * head_dim * kv_len``. With ``sparse`` the KV bytes are
    gathered through a compressed view and counted apart. It launches ``kernels_per_step`` kernels and, with
    tensor parallelism, all-reduces ``2 * layers`` hidden states and all-gathers the logits of
    ``B * tokens`` tokens.
    """
    m = as_spec(model)
    kv = batch * m.kv_bytes_per_token * kv_len
    rows = batch * tokens
    return StepWork(
        m.weight_bytes + (0 if sparse else kv),
        rows * FLOPS_PER_MAC * m.step_param_count,
        rows * m.attention_flops_per_entry * kv_len,
        kv if sparse else 0.0,
        kernels=m.kernels_per_step,
        allreduces=m.allreduces_per_step,
        allreduce_bytes=m.allreduces_per_step * rows * m.hidden_bytes_per_token,
        gathers=1,
        gather_bytes=rows * m.logit_bytes_per_token,
    )


def memory_time(hw: Hardware, w: StepWork) -> float:
    """``bytes / (n * achieved bandwidth) + sparse_bytes / (n * achieved sparse bandwidth)``."""
    return (w.nbytes / hw.memory_rate + w.sparse_bytes / hw.sparse_rate) / hw.devices


def compute_time(hw: Hardware, w: StepWork) -> float:
    """``matmul / (n * achieved FLOP/s) + attention / (n * achieved attention FLOP/s)``."""
    return (w.matmul_flops / hw.matmul_rate + w.attention_flops / hw.attention_rate) / hw.devices


def collective_time(hw: Hardware, w: StepWork) -> float:
    """Ring collectives over ``n = hw.devices`` devices, as NCCL's tuning model costs them.

    An all-reduce: ``COLLECTIVE_BASE_S + 2 (n - 1) * link_latency_s`` and ``2 (n - 1) / n`` of its bytes
    over the link; an all-gather: ``COLLECTIVE_BASE_S + (n - 1) * link_latency_s`` and ``(n - 1) / n`` of
    the gathered bytes. Zero on one device or without a modelled link.
    """
    n = hw.devices
    if n == 1 or hw.link_bandwidth is None:
        return 0.0
    hops = n - 1
    latency = w.allreduces * (COLLECTIVE_BASE_S + 2 * hops * hw.link_latency_s)
    latency += w.gathers * (COLLECTIVE_BASE_S + hops * hw.link_latency_s)
    link_bytes = hops / n * (2 * w.allreduce_bytes + w.gather_bytes)
    return latency + link_bytes / hw.link_bandwidth


def fixed_time(hw: Hardware, w: StepWork) -> float:
    """What the roofline leaves out: step overheads, kernel launches, collectives and round costs."""
    return w.steps * hw.overhead_s + w.kernels * hw.launch_s + collective_time(hw, w) + w.rounds * hw.round_s


def work_time(hw: Hardware, w: StepWork) -> float:
    """``max(memory, compute) + fixed`` (``memory + compute + fixed`` without ``hw.overlap``)."""
    memory, compute = memory_time(hw, w), compute_time(hw, w)
    return (max(memory, compute) if hw.overlap else memory + compute) + fixed_time(hw, w)


def _forward_time(
    m: ModelSpec, hw: Hardware, batch: int, kv_len: int, tokens: int, sparse: bool = False
) -> float:
    return work_time(hw, step_work(m, batch, kv_len, tokens, sparse))


def memory_needed(
    model: ModelSpec | ModelConfig,
    batch: int,
    context: int,
    draft: Draft = SELF_DRAFT,
    budget: int | None = None,
) -> float:
    """Bytes of weights (all parameters) and of ``batch`` sequences' KV at ``context``, all devices, and
    those of a small draft model: its weights and its KV (``context`` entries, or ``budget`` compressed).

    A self-draft's compressed view indexes the target's own pool and needs no memory of its own.
    """
    m = as_spec(model)
    total = m.param_bytes + batch * m.kv_bytes_per_token * context
    if draft.model is not None:
        kv_len = min(budget, context) if draft.compressed and budget else context
        total += draft.model.param_bytes
        total += batch * draft.model.kv_bytes_per_token * kv_len
    return total


def fits(
    model: ModelSpec | ModelConfig,
    hw: Hardware,
    batch: int,
    context: int,
    draft: Draft = SELF_DRAFT,
    budget: int | None = None,
) -> bool | None:
    """Whether ``memory_needed`` fits in the devices' memory (split ``hw.devices`` ways); None if unknown."""
    if hw.memory is None:
        return None
    return memory_needed(model, batch, context, draft, budget) <= hw.devices * hw.memory


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


def draft_work(
    model: ModelSpec | ModelConfig,
    batch: int,
    budget: int,
    context: int | None = None,
    draft: Draft = SELF_DRAFT,
) -> StepWork:
    """The work of one draft step (one new token per sequence); see ``t_draft``."""
    m = draft.model or as_spec(model)
    if draft.compressed:
        _check_positive(batch=batch, budget=budget)
        kv_len = budget if context is None else min(budget, context)
    else:
        if context is None:
            raise CostModelError("a draft with a full KV cache needs the context length")
        _check_positive(batch=batch, context=context)
        kv_len = context
    return step_work(m, batch, kv_len, 1, sparse=draft.compressed)


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
    The up to ``gamma`` draft tokens appended to the view are negligible next to ``K`` and left out. A small
    draft model pays its own launches and collectives, as the target does.
    """
    return work_time(hw, draft_work(model, batch, budget, context, draft))
