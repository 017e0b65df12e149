"""The draft's compressed view of each sequence's KV: StreamingLLM and SnapKV.

A view is a static list of positions per (layer, KV head), fixed after prefill, plus a recent window that
slides as tokens are committed. The draft attends to exactly these positions (and to its own tokens of the
current round, which follow the window), so its cost is set by the budget, not by the context length.

- **StreamingLLM**: the first ``sink`` positions (attention sinks) plus the most recent ``budget - sink``.
- **SnapKV**: the last ``window`` prompt positions are the observation window. Every earlier position is
  scored by the attention the window's queries give it (summed over the window and over the query heads of
  each GQA group, computed on the device by ``snapkv_scores``), smoothed by a moving average of
  ``pool_kernel`` positions, and the top ``budget - window`` per layer and KV head are kept, plus a recent
  window of ``window`` positions that slides as generation goes on.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..constants import DEFAULT_DRAFT, DRAFT_KINDS

DEFAULT_SINK = 4  # StreamingLLM attention sinks
DEFAULT_WINDOW = 32  # SnapKV observation window (and its recent window during generation)
DEFAULT_POOL_KERNEL = 5  # SnapKV score smoothing (moving average width, odd)
DEFAULT_BUDGET = 512  # KV entries the draft attends to


@dataclasses.dataclass(frozen=True)
class DraftSettings:
    """How one request's draft compresses its KV."""

    kind: str = DEFAULT_DRAFT
    budget: int = DEFAULT_BUDGET
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    pool_kernel: int = DEFAULT_POOL_KERNEL

    def validate(self, context_window: int) -> None:
        """Raise ValueError (one line) if these settings cannot work with ``context_window``."""
        if self.kind not in DRAFT_KINDS:
            raise ValueError(f"unknown draft {self.kind!r}; choose one of: {', '.join(DRAFT_KINDS)}")
        if not 0 < self.budget < context_window:
            raise ValueError(
                f"draft budget must be between 1 and the context window ({context_window}), got {self.budget}"
            )
        reserved = self.sink if self.kind == "streamingllm" else self.window
        name = "sink" if self.kind == "streamingllm" else "window"
        if reserved < 0 or self.budget <= reserved:
            raise ValueError(f"draft budget {self.budget} must exceed the {self.kind} {name} ({reserved})")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")


@dataclasses.dataclass
class CompressedView:
    """One sequence's view: ``static[layer, kv_head, :]`` positions plus the window ``[start, length)``."""

    static: np.ndarray  # [num_layers, num_kv_heads, n_static] int32, each row ascending
    window: int  # recent committed positions kept
    floor: int  # the window never starts before this position (the end of the static region)

    def window_start(self, committed: int) -> int:
        return max(self.floor, committed - self.window)


def streaming_view(
    settings: DraftSettings, prompt_len: int, num_layers: int, num_kv_heads: int
) -> CompressedView:
    """StreamingLLM: sinks plus a sliding window."""
    sinks = np.arange(min(settings.sink, prompt_len), dtype=np.int32)
    static = np.broadcast_to(sinks, (num_layers, num_kv_heads, len(sinks))).copy()
    return CompressedView(static, settings.budget - settings.sink, len(sinks))


def smooth(scores: np.ndarray, kernel: int) -> np.ndarray:
    """Moving average of width ``kernel`` along the last axis (same length, zero-padded ends)."""
    if kernel == 1:
        return scores
    half = kernel // 2
    padded = np.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(half + 1, half)])
    csum = np.cumsum(padded, axis=-1)
    return (csum[..., kernel:] - csum[..., :-kernel]) / kernel


def snapkv_view(
    settings: DraftSettings, prompt_len: int, scores: np.ndarray | None, num_layers: int, num_kv_heads: int
) -> CompressedView:
    """SnapKV: top-k of the smoothed window scores ``scores[layers, kv_heads, positions]`` plus a window."""
    candidates = max(prompt_len - settings.window, 0)
    keep = min(settings.budget - settings.window, candidates)
    if keep == candidates or scores is None:
        static = np.broadcast_to(np.arange(keep, dtype=np.int32), (num_layers, num_kv_heads, keep)).copy()
    else:
        smoothed = smooth(scores[..., :candidates].astype(np.float64), settings.pool_kernel)
        top = np.argpartition(-smoothed, keep - 1, axis=-1)[..., :keep]
        static = np.sort(top, axis=-1).astype(np.int32)
    return CompressedView(static, settings.window, candidates)


def pack_views(views: list[CompressedView]) -> tuple[np.ndarray, np.ndarray]:
    """``static_pos[batch, layers, kv_heads, max_static]`` (padded) and ``static_len[batch]`` for the op."""
    lens = np.array([v.static.shape[-1] for v in views], dtype=np.int32)
    layers, heads, _ = views[0].static.shape
    packed = np.zeros((len(views), layers, heads, max(int(lens.max()), 1)), dtype=np.int32)
    for i, v in enumerate(views):
        packed[i, :, :, : lens[i]] = v.static
    return packed, lens
