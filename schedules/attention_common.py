"""What the CPU and GPU attention kernels share: the online softmax's constants and the kernels' signatures.

Scores are scaled by ``LOG2E / sqrt(head_dim)`` so that ``exp2`` gives ``exp`` of the scaled score; a row's
running maximum starts at ``NEG_INF`` (finite, so that ``NEG_INF - NEG_INF`` is 0, not NaN).

Each kernel module writes the body of paged attention as a ``T.macro``; ``paged_attention_entry`` wraps it in
the one signature both views have (the sparse view adds its static positions, their counts and each row's
window start), so the op in ``compile/attention.py`` calls either kernel the same way; the SnapKV scores
kernels share ``attention_scores_entry`` likewise.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from ..constants import KV_TENSORS

LOG2E = math.log2(math.e)
NEG_INF = -3.0e38


def paged_attention_entry(
    name: str,
    body,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: str,
    kv_dtype: str,
    sparse: bool,
) -> tirx.PrimFunc:
    """The kernel ``name`` (queries and output in ``dtype``, the pool in ``kv_dtype``): buffers bound from
    handles, then ``body(q, pool, page_table, token_seq, token_pos,
    query_tiles, out, layer, static_pos, static_len, window_start, num_tiles)`` (the three sparse-view
    buffers are None for the dense view)."""
    Hq, Hkv, D, P = num_heads, num_kv_heads, head_dim, page_size

    @T.macro
    def bind_and_run(
        q_h, pool_h, page_table_h, token_seq_h, token_pos_h, query_tiles_h, out_h, layer,
        n, batch, num_layers, num_tiles, static_pos, static_len, window_start,
    ):  # fmt: skip
        num_pages = T.int32()
        max_pages = T.int32()
        q = T.match_buffer(q_h, (n, Hq, D), dtype)
        pool = T.match_buffer(pool_h, (num_layers, num_pages, KV_TENSORS, Hkv, P * D), kv_dtype)
        page_table = T.match_buffer(page_table_h, (batch, max_pages), "int32")
        token_seq = T.match_buffer(token_seq_h, (n,), "int32")
        token_pos = T.match_buffer(token_pos_h, (n,), "int32")
        query_tiles = T.match_buffer(query_tiles_h, (num_tiles, 2), "int32")
        out = T.match_buffer(out_h, (n, Hq, D), dtype)
        body(
            q, pool, page_table, token_seq, token_pos, query_tiles, out, layer,
            static_pos, static_len, window_start, num_tiles,
        )  # fmt: skip

    if sparse:

        @T.prim_func(s_tir=True)
        def sparse_attention(
            q_h: T.handle, pool_h: T.handle, page_table_h: T.handle, token_seq_h: T.handle,
            token_pos_h: T.handle, query_tiles_h: T.handle, static_pos_h: T.handle, static_len_h: T.handle,
            window_start_h: T.handle, layer: T.int32, out_h: T.handle,
        ):  # fmt: skip
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            n = T.int32()
            batch = T.int32()
            num_layers = T.int32()
            num_tiles = T.int32()
            max_static = T.int32()
            static_pos = T.match_buffer(static_pos_h, (batch, num_layers, Hkv, max_static), "int32")
            static_len = T.match_buffer(static_len_h, (batch,), "int32")
            window_start = T.match_buffer(window_start_h, (batch,), "int32")
            bind_and_run(
                q_h, pool_h, page_table_h, token_seq_h, token_pos_h, query_tiles_h, out_h, layer,
                n, batch, num_layers, num_tiles, static_pos, static_len, window_start,
            )  # fmt: skip

        return sparse_attention.with_attr("global_symbol", name)

    @T.prim_func(s_tir=True)
    def dense_attention(
        q_h: T.handle, pool_h: T.handle, page_table_h: T.handle, token_seq_h: T.handle, token_pos_h: T.handle,
        query_tiles_h: T.handle, layer: T.int32, out_h: T.handle,
    ):  # fmt: skip
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        batch = T.int32()
        num_layers = T.int32()
        num_tiles = T.int32()
        bind_and_run(
            q_h, pool_h, page_table_h, token_seq_h, token_pos_h, query_tiles_h, out_h, layer,
            n, batch, num_layers, num_tiles, None, None, None,
        )  # fmt: skip

    return dense_attention.with_attr("global_symbol", name)


def attention_scores_entry(
    name: str,
    body,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: str,
    kv_dtype: str,
) -> tirx.PrimFunc:
    """The SnapKV scores kernel ``name``: buffers bound from handles, then ``body(q, pool, page_table,
    token_seq, token_pos, layer, scores, n, batch, max_pages)``."""
    Hq, Hkv, D, P = num_heads, num_kv_heads, head_dim, page_size

    @T.prim_func(s_tir=True)
    def attention_scores(
        q_h: T.handle,
        pool_h: T.handle,
        page_table_h: T.handle,
        token_seq_h: T.handle,
        token_pos_h: T.handle,
        layer: T.int32,
        scores_h: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        num_layers = T.int32()
        num_pages = T.int32()
        batch = T.int32()
        max_pages = T.int32()
        q = T.match_buffer(q_h, (n, Hq, D), dtype)
        pool = T.match_buffer(pool_h, (num_layers, num_pages, KV_TENSORS, Hkv, P * D), kv_dtype)
        page_table = T.match_buffer(page_table_h, (batch, max_pages), "int32")
        token_seq = T.match_buffer(token_seq_h, (n,), "int32")
        token_pos = T.match_buffer(token_pos_h, (n,), "int32")
        scores = T.match_buffer(scores_h, (batch, Hkv, max_pages * P), "float32")
        body(q, pool, page_table, token_seq, token_pos, layer, scores, n, batch, max_pages)

    return attention_scores.with_attr("global_symbol", name)


def kv_append_entry(
    name: str, body, num_kv_heads: int, head_dim: int, page_size: int, dtype: str, kv_dtype: str
) -> tirx.PrimFunc:
    """The KV append kernel ``name`` (new K and V in ``dtype``, the pool in ``kv_dtype``): buffers bound from
    handles, then ``body(pool, k, v, slot, layer, n)``."""
    Hkv, D, P = num_kv_heads, head_dim, page_size

    @T.prim_func(s_tir=True)
    def kv_append(pool_h: T.handle, k_h: T.handle, v_h: T.handle, slot_h: T.handle, layer: T.int32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        num_layers = T.int32()
        num_pages = T.int32()
        n = T.int32()
        pool = T.match_buffer(pool_h, (num_layers, num_pages, KV_TENSORS, Hkv, P * D), kv_dtype)
        k = T.match_buffer(k_h, (n, Hkv, D), dtype)
        v = T.match_buffer(v_h, (n, Hkv, D), dtype)
        slot = T.match_buffer(slot_h, (n,), "int32")
        body(pool, k, v, slot, layer, n)

    return kv_append.with_attr("global_symbol", name)
