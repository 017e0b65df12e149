"""GPU kernels (CUDA, Metal, Vulkan) for the paged KV pool: KV append and paged attention (dense and sparse).

The signatures and semantics are those of ``cpu_attention`` (see ``mlc_magicdec.compile.attention``); only
the page layout and the parallel schedule differ.

Page layout on GPU (the last axis of the pool, ``page_size * head_dim`` values per page and KV head): keys and
values are both row-major, ``x[slot * head_dim + d]``, so the threads of a warp read one key's features as one
coalesced run.

Attention is flash-attention tiled, one thread block per (query tile, KV head, group of query heads): a tile's
tokens times the block's query heads share every block of ``KEY_BLOCKS`` keys staged in shared memory, with an
online softmax over key blocks. Inside a block the ``THREADS`` threads take turns over phases separated by
barriers: gather the key positions of the block (dense: ``0..pos``; sparse: the static list, then the window),
stage the keys and values, score every (row, key) pair, update each row's running max and sum, and rescale and
accumulate every (row, feature) output. Staged keys are transposed (``kt[d, key]``), so a warp scoring one row
against consecutive keys reads consecutive shared-memory words (no bank conflicts). Queries, outputs and
statistics stay in shared memory, sized for the largest tile (``QUERY_TILE`` tokens); the query heads of a GQA
group are split over blocks when a whole group does not fit the target's shared memory per block (Metal and
Vulkan: 32 KB).

Long keys at a small batch (flash-decoding): when the (tile, KV head, head group) blocks are fewer than
``TARGET_BLOCKS`` (a decode of batch 1 has one per KV head), each one's keys are also split into ranges of
at least ``MIN_SPLIT_KEYS`` keys, one block each. The number of ranges is decided at run time from the
number of tiles and the page table's width (``split_count``); each range's block writes its rows' partial
output (not yet divided by the sum), running max and sum to a global scratch buffer (a workspace of
``blocks x ranges x rows x (head_dim + 2)`` floats, allocated only when splitting), and a second kernel of the
same function merges every row's ranges (each rescaled by ``exp2(max_range - max)``). With one range the
block writes its output directly, as without the split. The page table is as wide as the longest sequence, so
the dense view's ranges cover its keys evenly; a sparse view's few keys fill its first ranges of
``MIN_SPLIT_KEYS`` and leave the others empty (blocks that only write an empty partial).
"""

from __future__ import annotations

import math

import numpy as np
from tvm.ir import Expr
from tvm.script import tirx as T
from tvm.target import Target

from ..constants import QUERY_TILE
from ..errors import TargetError
from .attention_common import LOG2E, NEG_INF, attention_scores_entry, kv_append_entry, paged_attention_entry

THREADS = 128  # threads per block (4 warps; at most Metal's and Vulkan's 256)
KEY_BLOCKS = (32, 16)  # keys staged in shared memory per step, by preference (two pages, one page)
CUDA_STATIC_SHARED = 48 * 1024  # bytes of static shared memory per block on every CUDA GPU
ROW_STATS = 4  # per-row shared values: max, sum, rescale factor, position
MASKED = -1.0e38  # scores below this are masked keys: their probability is exactly 0
INT_MAX = 2147483647
SM_COUNT = 128  # streaming multiprocessors of an RTX 4090, the largest GPU the split is sized for
TARGET_BLOCKS = 2 * SM_COUNT  # attention blocks wanted in one launch (two per SM) before splitting stops
MIN_SPLIT_KEYS = 128  # fewest keys in one range of a split (at 8k keys: at most 64 ranges)


def split_count(blocks: int | Expr, max_keys: int | Expr) -> Expr:
    """Key ranges per attention block: about ``TARGET_BLOCKS`` blocks in all, no range shorter than
    ``MIN_SPLIT_KEYS`` of the ``max_keys`` a row can see, and at least 1."""
    return T.max(1, T.min(TARGET_BLOCKS // blocks, max_keys // MIN_SPLIT_KEYS))


def shared_bytes(heads: int, key_block: int, head_dim: int, dtype: str, kv_dtype: str) -> int:
    """Shared memory of one attention block: ``heads`` query heads of a group, ``key_block`` keys a step."""
    item, kv_item = np.dtype(dtype).itemsize, np.dtype(kv_dtype).itemsize
    per_row = head_dim * (item + 4) + 2 * key_block * 4 + ROW_STATS * 4  # query, fp32 output, s, p, stats
    per_key = 2 * head_dim * kv_item + 2 * 4  # key, value, position, slot
    return QUERY_TILE * heads * per_row + key_block * per_key


def block_shape(group: int, head_dim: int, dtype: str, kv_dtype: str, shared_limit: int) -> tuple[int, int]:
    """``(heads, key_block)`` of an attention block within ``shared_limit`` bytes: the most query heads of the
    GQA group (a divisor of it, so fewer re-reads of each key), then the longest key block."""
    for heads in (h for h in range(group, 0, -1) if group % h == 0):
        for key_block in KEY_BLOCKS:
            if shared_bytes(heads, key_block, head_dim, dtype, kv_dtype) <= shared_limit:
                return heads, key_block
    need = shared_bytes(1, KEY_BLOCKS[-1], head_dim, dtype, kv_dtype)
    raise TargetError(
        f"attention with head_dim {head_dim} in {dtype} needs {need} bytes of GPU shared memory, over this "
        f"target's {shared_limit}; compile with --dtype float16"
    )


def shared_limit(target: Target) -> int:
    """Shared memory per block for ``target``'s kernels (CUDA: the 48 KB of static shared)."""
    limit = target.attrs.get("max_shared_memory_per_block")
    return int(limit) if limit else CUDA_STATIC_SHARED


def _item(it, tx):
    """Work item of thread ``tx`` in step ``it`` of a loop that the block's threads share.

    An index expression rather than a let binding: TVM's barrier planner only sees that two shared-memory
    accesses belong to one thread when their indices visibly use ``threadIdx`` (which is also why GPU builds
    turn off TIR's common-subexpression elimination, see ``schedules.gpu``).
    """
    return it * THREADS + tx


def kv_append(num_kv_heads: int, head_dim: int, page_size: int, dtype: str, kv_dtype: str):
    """Write each new token's K and V (row-major pages, rounded to ``kv_dtype``) into its slot of one
    layer; one thread a value."""
    Hkv, D, P = num_kv_heads, head_dim, page_size

    @T.macro
    def append_body(pool, k, v, slot, layer, n):
        for bx in T.thread_binding(T.ceildiv(n * Hkv * D, THREADS), thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("kv_append"):
                    T.reads()
                    T.writes()
                    e: T.let[T.int32] = bx * THREADS + tx
                    if e < n * Hkv * D:
                        t: T.let[T.int32] = e // (Hkv * D)
                        h: T.let[T.int32] = e // D % Hkv
                        d: T.let[T.int32] = e % D
                        s: T.let[T.int32] = slot[t]
                        pool[layer, s // P, 0, h, s % P * D + d] = T.Cast(kv_dtype, k[t, h, d])
                        pool[layer, s // P, 1, h, s % P * D + d] = T.Cast(kv_dtype, v[t, h, d])

    return kv_append_entry("kv_append_gpu", append_body, Hkv, D, P, dtype, kv_dtype)


def paged_attention(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: str,
    kv_dtype: str,
    sparse: bool,
    shared_limit: int = CUDA_STATIC_SHARED,
):
    """Tiled attention over the pool. Dense: keys ``0 .. pos``; sparse: the static list, then the window.
    Queries and output in ``dtype``, the pool (and its staged keys and values) in ``kv_dtype``."""
    Hq, Hkv, D, P = num_heads, num_kv_heads, head_dim, page_size
    G = Hq // Hkv
    HB, KB = block_shape(G, D, dtype, kv_dtype, shared_limit)  # query heads per block, keys per step
    SPLIT = G // HB  # blocks per (tile, KV head)
    MR = QUERY_TILE * HB  # most rows (token, head) of one block
    MIN_RANGE = T.ceildiv(MIN_SPLIT_KEYS, KB)  # fewest key blocks in one range of a split
    scale = LOG2E / math.sqrt(D)

    def load_or_zero(buf, b):
        return 0 if buf is None else buf[b]

    def key_position(static_pos, b, layer, kh, idx, n_static, w0):
        """Position of the ``idx``-th key of the view: the static list first, then ``w0, w0 + 1, ...``."""
        if static_pos is None:
            return idx
        return T.if_then_else(idx < n_static, static_pos[b, layer, kh, idx], w0 + idx - n_static)

    @T.macro
    def body(
        q, pool, page_table, token_seq, token_pos, query_tiles, out, layer,
        static_pos, static_len, window_start, num_tiles,
    ):  # fmt: skip
        groups: T.let[T.int32] = num_tiles * Hkv * SPLIT  # blocks of (tile, KV head, head group)
        # A row's keys are at most the page table's positions (the sparse view's too: its static positions
        # lie before its window).
        splits: T.let[T.int32] = split_count(groups, page_table.shape[1] * P)
        # Partial results of a split, by (block, row): the output not yet divided by the sum, [max, sum].
        scratch: T.let[T.int32] = T.Select(splits > 1, groups * splits * MR, 1)
        part_acc = T.alloc_buffer((scratch, D), "float32")
        part_stat = T.alloc_buffer((scratch, 2), "float32")
        for bx in T.thread_binding(groups * splits, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    qs = T.sblock_alloc_buffer((MR, D), dtype, scope="shared")
                    acc = T.sblock_alloc_buffer((MR, D), "float32", scope="shared")
                    kt = T.sblock_alloc_buffer((D, KB), kv_dtype, scope="shared")  # keys, transposed
                    vs = T.sblock_alloc_buffer((KB, D), kv_dtype, scope="shared")
                    s = T.sblock_alloc_buffer((MR, KB), "float32", scope="shared")  # scores
                    p = T.sblock_alloc_buffer((MR, KB), "float32", scope="shared")  # probabilities
                    row_max = T.sblock_alloc_buffer((MR,), "float32", scope="shared")
                    row_sum = T.sblock_alloc_buffer((MR,), "float32", scope="shared")
                    row_scale = T.sblock_alloc_buffer((MR,), "float32", scope="shared")
                    row_pos = T.sblock_alloc_buffer((MR,), "int32", scope="shared")
                    kpos = T.sblock_alloc_buffer((KB,), "int32", scope="shared")
                    kslot = T.sblock_alloc_buffer((KB,), "int32", scope="shared")
                    dot = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    stat = T.sblock_alloc_buffer((2,), "float32", scope="local")  # a row's new max, block sum
                    group: T.let[T.int32] = bx // splits
                    tile: T.let[T.int32] = group // (Hkv * SPLIT)
                    kh: T.let[T.int32] = group // SPLIT % Hkv
                    h0: T.let[T.int32] = kh * G + group % SPLIT * HB  # first query head of this block
                    r0: T.let[T.int32] = query_tiles[tile, 0]
                    rows: T.let[T.int32] = (query_tiles[tile, 1] - r0) * HB
                    b: T.let[T.int32] = token_seq[r0]
                    n_static: T.let[T.int32] = load_or_zero(static_len, b)
                    w0: T.let[T.int32] = load_or_zero(window_start, b)
                    n_keys: T.let[T.int32] = n_static + token_pos[query_tiles[tile, 1] - 1] - w0 + 1
                    n_blocks: T.let[T.int32] = T.ceildiv(n_keys, KB)
                    # This block's range of key blocks (all of them without a split; maybe none at the end).
                    range_blocks: T.let[T.int32] = T.max(T.ceildiv(n_blocks, splits), MIN_RANGE)
                    blk_lo: T.let[T.int32] = bx % splits * range_blocks
                    blk_hi: T.let[T.int32] = T.min(n_blocks, blk_lo + range_blocks)
                    # Row m is token r0 + m // HB, query head h0 + m % HB.
                    for it in T.serial(T.ceildiv(rows * D, THREADS)):
                        if it * THREADS + tx < rows * D:
                            qs[_item(it, tx) // D, _item(it, tx) % D] = q[
                                r0 + _item(it, tx) // D // HB, h0 + _item(it, tx) // D % HB, _item(it, tx) % D
                            ]
                            acc[_item(it, tx) // D, _item(it, tx) % D] = T.float32(0)
                    for it in T.serial(T.ceildiv(rows, THREADS)):
                        if it * THREADS + tx < rows:
                            row_max[_item(it, tx)] = T.float32(NEG_INF)
                            row_sum[_item(it, tx)] = T.float32(0)
                            row_pos[_item(it, tx)] = token_pos[r0 + _item(it, tx) // HB]
                    T.tvm_storage_sync("shared")
                    for bi in T.serial(T.max(blk_hi - blk_lo, 0)):
                        blk: T.let[T.int32] = blk_lo + bi
                        # 1. positions and slots of the block's keys (past the end: the last key, masked)
                        if tx < KB:
                            idx: T.let[T.int32] = T.min(blk * KB + tx, n_keys - 1)
                            pos: T.let[T.int32] = key_position(static_pos, b, layer, kh, idx, n_static, w0)
                            kpos[tx] = T.if_then_else(blk * KB + tx < n_keys, pos, INT_MAX)
                            kslot[tx] = page_table[b, pos // P] * P + pos % P
                        T.tvm_storage_sync("shared")
                        # 2. stage keys and values
                        for it in T.serial(T.ceildiv(KB * D, THREADS)):
                            if it * THREADS + tx < KB * D:
                                page: T.let[T.int32] = kslot[_item(it, tx) // D] // P
                                at: T.let[T.int32] = kslot[_item(it, tx) // D] % P * D + _item(it, tx) % D
                                kt[_item(it, tx) % D, _item(it, tx) // D] = pool[layer, page, 0, kh, at]
                                vs[_item(it, tx) // D, _item(it, tx) % D] = pool[layer, page, 1, kh, at]
                        T.tvm_storage_sync("shared")
                        # 3. scores of every (row, key) pair, masked past each row's position
                        for it in T.serial(T.ceildiv(rows * KB, THREADS)):
                            if it * THREADS + tx < rows * KB:
                                dot[0] = T.float32(0)
                                for d in T.serial(D):
                                    dot[0] = dot[0] + T.Cast("float32", qs[_item(it, tx) // KB, d]) * T.Cast(
                                        "float32", kt[d, _item(it, tx) % KB]
                                    )
                                s[_item(it, tx) // KB, _item(it, tx) % KB] = T.Select(
                                    kpos[_item(it, tx) % KB] <= row_pos[_item(it, tx) // KB],
                                    dot[0] * T.float32(scale),
                                    T.float32(NEG_INF),
                                )
                        T.tvm_storage_sync("shared")
                        # 4. online softmax: each row's new max and rescale factor, then the probabilities,
                        # then each row's running sum (no loop under a condition writes shared memory, so the
                        # barriers TVM adds stay outside conditions)
                        for it in T.serial(T.ceildiv(rows, THREADS)):
                            if it * THREADS + tx < rows:
                                stat[0] = row_max[_item(it, tx)]
                                for j in T.serial(KB):
                                    stat[0] = T.max(stat[0], s[_item(it, tx), j])
                                row_scale[_item(it, tx)] = T.Select(
                                    row_max[_item(it, tx)] > T.float32(MASKED),
                                    T.exp2(row_max[_item(it, tx)] - stat[0]),
                                    T.float32(0),
                                )
                                row_max[_item(it, tx)] = stat[0]
                        T.tvm_storage_sync("shared")
                        for it in T.serial(T.ceildiv(rows * KB, THREADS)):
                            if it * THREADS + tx < rows * KB:
                                p[_item(it, tx) // KB, _item(it, tx) % KB] = T.Select(
                                    s[_item(it, tx) // KB, _item(it, tx) % KB] > T.float32(MASKED),
                                    T.exp2(
                                        s[_item(it, tx) // KB, _item(it, tx) % KB]
                                        - row_max[_item(it, tx) // KB]
                                    ),
                                    T.float32(0),
                                )
                        T.tvm_storage_sync("shared")
                        for it in T.serial(T.ceildiv(rows, THREADS)):
                            if it * THREADS + tx < rows:
                                stat[1] = T.float32(0)
                                for j in T.serial(KB):
                                    stat[1] = stat[1] + p[_item(it, tx), j]
                                row_sum[_item(it, tx)] = (
                                    row_sum[_item(it, tx)] * row_scale[_item(it, tx)] + stat[1]
                                )
                        T.tvm_storage_sync("shared")
                        # 5. rescale and accumulate every (row, feature) output
                        for it in T.serial(T.ceildiv(rows * D, THREADS)):
                            if it * THREADS + tx < rows * D:
                                dot[0] = (
                                    acc[_item(it, tx) // D, _item(it, tx) % D] * row_scale[_item(it, tx) // D]
                                )
                                for j in T.serial(KB):
                                    dot[0] = dot[0] + p[_item(it, tx) // D, j] * T.Cast(
                                        "float32", vs[j, _item(it, tx) % D]
                                    )
                                acc[_item(it, tx) // D, _item(it, tx) % D] = dot[0]
                        T.tvm_storage_sync("shared")
                    if splits == 1:
                        for it in T.serial(T.ceildiv(rows * D, THREADS)):
                            if it * THREADS + tx < rows * D:
                                out[
                                    r0 + _item(it, tx) // D // HB,
                                    h0 + _item(it, tx) // D % HB,
                                    _item(it, tx) % D,
                                ] = T.Cast(
                                    dtype,
                                    acc[_item(it, tx) // D, _item(it, tx) % D] / row_sum[_item(it, tx) // D],
                                )
                    else:
                        for it in T.serial(T.ceildiv(rows * D, THREADS)):
                            if it * THREADS + tx < rows * D:
                                part_acc[bx * MR + _item(it, tx) // D, _item(it, tx) % D] = acc[
                                    _item(it, tx) // D, _item(it, tx) % D
                                ]
                        for it in T.serial(T.ceildiv(rows, THREADS)):
                            if it * THREADS + tx < rows:
                                part_stat[bx * MR + _item(it, tx), 0] = row_max[_item(it, tx)]
                                part_stat[bx * MR + _item(it, tx), 1] = row_sum[_item(it, tx)]
        if splits > 1:
            # Merge each row's ranges: every (row, feature) output rescales the ranges to the row's max.
            for bx in T.thread_binding(groups, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        T.reads()
                        T.writes()
                        stat = T.sblock_alloc_buffer((3,), "float32", scope="local")  # max, sum, scale
                        merged = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        tile: T.let[T.int32] = bx // (Hkv * SPLIT)
                        kh: T.let[T.int32] = bx // SPLIT % Hkv
                        h0: T.let[T.int32] = kh * G + bx % SPLIT * HB
                        r0: T.let[T.int32] = query_tiles[tile, 0]
                        rows: T.let[T.int32] = (query_tiles[tile, 1] - r0) * HB
                        for it in T.serial(T.ceildiv(rows * D, THREADS)):
                            if it * THREADS + tx < rows * D:
                                m: T.let[T.int32] = _item(it, tx) // D
                                d: T.let[T.int32] = _item(it, tx) % D
                                stat[0] = T.float32(NEG_INF)
                                for sp in T.serial(splits):
                                    stat[0] = T.max(stat[0], part_stat[(bx * splits + sp) * MR + m, 0])
                                stat[1] = T.float32(0)
                                merged[0] = T.float32(0)
                                for sp in T.serial(splits):
                                    # A range with no key of the row has max NEG_INF and adds nothing.
                                    stat[2] = T.Select(
                                        part_stat[(bx * splits + sp) * MR + m, 0] > T.float32(MASKED),
                                        T.exp2(part_stat[(bx * splits + sp) * MR + m, 0] - stat[0]),
                                        T.float32(0),
                                    )
                                    stat[1] = stat[1] + part_stat[(bx * splits + sp) * MR + m, 1] * stat[2]
                                    merged[0] = merged[0] + part_acc[(bx * splits + sp) * MR + m, d] * stat[2]
                                out[r0 + m // HB, h0 + m % HB, d] = T.Cast(dtype, merged[0] / stat[1])

    name = "sparse_attention_gpu" if sparse else "dense_attention_gpu"
    return paged_attention_entry(name, body, Hq, Hkv, D, P, dtype, kv_dtype, sparse)


def attention_scores(
    num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: str, kv_dtype: str
):
    """SnapKV scores: for each row and KV head, the softmax attention each key position receives, summed over
    the row's query tokens and the query heads of the GQA group (dense view, causal).

    One block per (row, KV head); for each query (token, head) of the row, the threads split the keys: a
    first pass computes each thread's running max and sum, one thread merges them, and a second pass adds
    every key's probability (each key has one owner thread, so the sums need no atomics).
    """
    Hq, Hkv, D, P = num_heads, num_kv_heads, head_dim, page_size
    G = Hq // Hkv
    scale = LOG2E / math.sqrt(D)

    @T.macro
    def score(dot, qf, pool, page_table, layer, b, kh, j):
        """``dot[0]``: the scaled score of key position ``j`` for the query in ``qf``."""
        dot[0] = T.float32(0)
        for d in T.serial(D):
            dot[0] = dot[0] + qf[d] * T.Cast(
                "float32", pool[layer, page_table[b, j // P], 0, kh, j % P * D + d]
            )

    @T.macro
    def scores_body(q, pool, page_table, token_seq, token_pos, layer, scores, n, batch, max_pages):
        for bx in T.thread_binding(batch * Hkv, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("scores"):
                    T.reads()
                    T.writes()
                    qf = T.sblock_alloc_buffer((D,), "float32", scope="shared")
                    part_max = T.sblock_alloc_buffer((THREADS,), "float32", scope="shared")
                    part_sum = T.sblock_alloc_buffer((THREADS,), "float32", scope="shared")
                    total = T.sblock_alloc_buffer((2,), "float32", scope="shared")  # [max, sum] of one query
                    dot = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    run = T.sblock_alloc_buffer((2,), "float32", scope="local")  # this thread's [max, sum]
                    b: T.let[T.int32] = bx // Hkv
                    kh: T.let[T.int32] = bx % Hkv
                    for it in T.serial(T.ceildiv(max_pages * P, THREADS)):
                        if it * THREADS + tx < max_pages * P:
                            scores[b, kh, it * THREADS + tx] = T.float32(0)
                    for t in T.serial(n):
                        # Barriers may not sit under a condition: tokens of other rows run zero key steps.
                        steps: T.let[T.int32] = T.Select(
                            token_seq[t] == b, T.ceildiv(token_pos[t] + 1, THREADS), 0
                        )
                        for g in T.serial(G):
                            T.tvm_storage_sync("shared")
                            for it in T.serial(T.ceildiv(D, THREADS)):
                                if it * THREADS + tx < D:
                                    qf[it * THREADS + tx] = T.Cast(
                                        "float32", q[t, kh * G + g, it * THREADS + tx]
                                    ) * T.float32(scale)
                            T.tvm_storage_sync("shared")
                            run[0] = T.float32(NEG_INF)
                            run[1] = T.float32(0)
                            for it in T.serial(steps):  # pass 1: this thread's running max and sum
                                if it * THREADS + tx <= token_pos[t]:
                                    score(dot, qf, pool, page_table, layer, b, kh, it * THREADS + tx)
                                    run[1] = run[1] * T.exp2(run[0] - T.max(run[0], dot[0])) + T.exp2(
                                        dot[0] - T.max(run[0], dot[0])
                                    )
                                    run[0] = T.max(run[0], dot[0])
                            part_max[tx] = run[0]
                            part_sum[tx] = run[1]
                            T.tvm_storage_sync("shared")
                            if tx == 0:
                                run[0] = T.float32(NEG_INF)
                                for i in T.serial(THREADS):
                                    run[0] = T.max(run[0], part_max[i])
                                run[1] = T.float32(0)
                                for i in T.serial(THREADS):
                                    run[1] = run[1] + part_sum[i] * T.exp2(part_max[i] - run[0])
                                total[0] = run[0]
                                total[1] = run[1]
                            T.tvm_storage_sync("shared")
                            for it in T.serial(steps):  # pass 2: add each key's probability
                                if it * THREADS + tx <= token_pos[t]:
                                    score(dot, qf, pool, page_table, layer, b, kh, _item(it, tx))
                                    scores[b, kh, _item(it, tx)] = (
                                        scores[b, kh, _item(it, tx)] + T.exp2(dot[0] - total[0]) / total[1]
                                    )

    return attention_scores_entry("attention_scores_gpu", scores_body, Hq, Hkv, D, P, dtype, kv_dtype)
