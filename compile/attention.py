"""The KV pool and the one attention op with two views (dense and sparse).

Storage: one tensor for the whole model,
``pool[num_layers, num_pages, 2, num_kv_heads, page_size * head_dim]``
(index 0 of the third axis holds keys, 1 values; how a page's values are laid out is the target kernels'
choice, see ``schedules``). Keys are stored with RoPE already applied at their absolute positions, so any
subset of them can be attended to without a fix-up. The pool's dtype (``--kv-dtype``) may be narrower than the
activations': keys and values are rounded to it when written, and read back into fp32 arithmetic. The runtime
owns the page tables.

Per-call index tensors (all int32, built by the runtime):

- ``token_slots[n]``: the physical slot (``page * page_size + offset``) each new token's K/V is written to;
- ``token_seq[n]``: the batch row of each new token; ``token_pos[n]``: its absolute position;
- ``page_table[batch, max_pages]``: physical page of each logical page of each row;
- ``query_tiles[num_tiles, 2]``: ``[first, end)`` token ranges, each a run of at most ``QUERY_TILE`` tokens of
  one sequence in ascending positions; attention work is parallel over tiles and KV heads.

Views:

- **dense** (target): token ``t`` attends to positions ``0 .. token_pos[t]`` of its sequence;
- **sparse** (draft): token ``t`` attends to ``static_pos[b, layer, kv_head, :static_len[b]]`` (the compressed
  prefix: attention sinks or SnapKV's top-k, per layer and KV head) and then to the contiguous window
  ``window_start[b] .. token_pos[t]``, which holds the recent committed tokens and the draft's own tokens of
  this round. Its cost is ``O(static_len + window)``, independent of the context length.
"""

from __future__ import annotations

import dataclasses
import functools

from tvm import tirx
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from ..constants import PAGE_SIZE


@dataclasses.dataclass
class SparseView:
    """The draft's compressed view of each sequence (see module docstring)."""

    static_pos: Tensor  # [batch, num_layers, num_kv_heads, max_static] int32
    static_len: Tensor  # [batch] int32
    window_start: Tensor  # [batch] int32


@dataclasses.dataclass
class AttentionBatch:
    """Index tensors that place a ragged batch of new tokens in the pool."""

    token_slots: Tensor
    token_seq: Tensor
    token_pos: Tensor
    page_table: Tensor
    query_tiles: Tensor
    sparse: SparseView | None = None


def _kernels(target: Target):
    """The kernel generators for a target (see ``schedules``)."""
    from ..schedules import attention_kernels

    return attention_kernels(target)


@functools.cache
def _append_func(target: Target, num_kv_heads: int, head_dim: int, dtype: str, kv_dtype: str):
    return _kernels(target).kv_append(num_kv_heads, head_dim, PAGE_SIZE, dtype, kv_dtype)


@functools.cache
def _attention_func(
    target: Target, num_heads: int, num_kv_heads: int, head_dim: int, dtype: str, kv_dtype: str, sparse: bool
):
    shape = (num_heads, num_kv_heads, head_dim, PAGE_SIZE, dtype, kv_dtype, sparse)
    return _kernels(target).paged_attention(*shape)


@functools.cache
def _scores_func(target: Target, num_heads: int, num_kv_heads: int, head_dim: int, dtype: str, kv_dtype: str):
    return _kernels(target).attention_scores(num_heads, num_kv_heads, head_dim, PAGE_SIZE, dtype, kv_dtype)


def append_kv(
    pool: Tensor, k: Tensor, v: Tensor, batch: AttentionBatch, layer: int, target: Target
) -> Tensor:
    """Write the new tokens' K (already rotated) and V of one layer into the pool, in place (rounded to the
    pool's dtype)."""
    _, num_kv_heads, head_dim = k.shape
    func = _append_func(target, int(num_kv_heads), int(head_dim), k.dtype, pool.dtype)
    return op.tensor_ir_inplace_op(
        func,
        "kv_append",
        args=[pool, k, v, batch.token_slots, tirx.IntImm("int32", layer)],
        inplace_indices=[0],
        out=Tensor.placeholder(pool.shape, pool.dtype),
    )


def attention(
    q: Tensor, pool: Tensor, batch: AttentionBatch, layer: int, num_kv_heads: int, target: Target
) -> Tensor:
    """Attention of ``q[n, num_heads, head_dim]`` over the pool, through the dense or the sparse view."""
    n, num_heads, head_dim = q.shape
    view = batch.sparse
    func = _attention_func(
        target, int(num_heads), num_kv_heads, int(head_dim), q.dtype, pool.dtype, view is not None
    )
    args = [q, pool, batch.page_table, batch.token_seq, batch.token_pos, batch.query_tiles]
    if view is not None:
        args += [view.static_pos, view.static_len, view.window_start]
    name = "sparse_attention" if view is not None else "dense_attention"
    return op.tensor_ir_op(
        func,
        name,
        args=[*args, tirx.IntImm("int32", layer)],
        out=Tensor.placeholder((n, num_heads, head_dim), q.dtype),
    )


def attention_scores(
    q: Tensor, pool: Tensor, batch: AttentionBatch, layer: int, num_kv_heads: int, target: Target
) -> Tensor:
    """SnapKV's observation-window scores of one layer: ``[batch, num_kv_heads, max_pages * PAGE_SIZE]``.

    Entry ``[b, h, j]`` is the softmax attention that position ``j`` receives from row ``b``'s query tokens,
    summed over those tokens and over the query heads of KV head ``h`` (dense, causal view).
    """
    _, num_heads, head_dim = q.shape
    rows, max_pages = batch.page_table.shape
    func = _scores_func(target, int(num_heads), num_kv_heads, int(head_dim), q.dtype, pool.dtype)
    return op.tensor_ir_op(
        func,
        "attention_scores",
        args=[q, pool, batch.page_table, batch.token_seq, batch.token_pos, tirx.IntImm("int32", layer)],
        out=Tensor.placeholder((rows, num_kv_heads, max_pages * PAGE_SIZE), "float32"),
    )
