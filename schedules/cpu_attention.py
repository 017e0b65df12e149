"""CPU (llvm) kernels for the paged KV pool: KV append and tiled paged attention (dense and sparse views).

Page layout on CPU (the last axis of the pool, ``page_size * head_dim`` values per page and KV head):

- keys are stored **transposed**, ``k[d * page_size + slot]``, so one page of keys is a ``[head_dim, page]``
  matrix and scores for a whole page are ``head_dim`` vector FMAs per query row, with no horizontal sums;
- values are stored row-major, ``v[slot * head_dim + d]``.

Attention is tiled the way flash-attention is: one parallel work item per (query tile, KV head). A query tile
is a run of consecutive tokens of one sequence (given by ``query_tiles``), and all its tokens times all query
heads of the GQA group share each block of ``KEY_BLOCK`` keys loaded, with an online softmax over blocks.
When there are too few items to keep every thread busy (a decode or verify step of a small batch: batch 1
has one item per KV head), the dense view also splits each sequence's keys into ranges, one item each, and
a second pass merges the ranges' partial softmax sums (flash-decoding).
``exp2`` is a vectorizable polynomial (``fast_exp2``) instead of a libm call per score.

The semantics of every buffer are documented in ``mlc_magicdec.compile.attention``.
"""

from __future__ import annotations

import math

import numpy as np
from tvm.script import tirx as T

from ..constants import PAGE_SIZE, QUERY_TILE
from .attention_common import LOG2E, NEG_INF, attention_scores_entry, kv_append_entry, paged_attention_entry
from .cpu_isa import VectorUnit

KEY_BLOCK = PAGE_SIZE  # keys per block: one page in the dense view
MAX_ROW_TILE = 4  # most query rows scored together against each key block loaded
SCORE_ACCUMULATORS = VectorUnit(lanes=16, registers=32).score_accumulators  # default: AVX-512's (12)
PREFETCH_PAGES = 2  # the dense view prefetches the K and V pages this many blocks ahead
CACHE_LINE = 64  # bytes per cache line
PREFETCH_READ, PREFETCH_LOCALITY, PREFETCH_DATA = 0, 3, 1  # llvm.prefetch: read, keep in all caches, data
PARALLEL_ITEMS = 24  # the dense view splits keys until a step has about this many items (threads to balance)
MAX_SPLITS = 16  # most key ranges per item
MIN_SPLIT_BLOCKS = 16  # fewest key blocks in a range (256 keys)
EXP2_MIN = -126.0  # below this 2**x underflows float32; inputs are clamped here
EXP2_DEGREE = 6  # polynomial degree for 2**f on [0, 1): max relative error ~1e-8
_f = np.linspace(0.0, 1.0, 2001)
EXP2_COEFFS = [float(c) for c in np.polyfit(_f, 2.0**_f, EXP2_DEGREE)]  # highest degree first


def fast_exp2(x):
    """``2**x`` for float32 ``x <= 0``: split into integer and fraction, polynomial for the fraction."""
    x = T.max(x, T.float32(EXP2_MIN))
    whole = T.floor(x)
    frac = x - whole
    poly = T.float32(EXP2_COEFFS[0])
    for c in EXP2_COEFFS[1:]:
        poly = poly * frac + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", whole) + 127, 23))
    return poly * scale


def row_tile(group: int) -> int:
    """Query rows processed together: a whole GQA group if it fits, else ``MAX_ROW_TILE`` (padded)."""
    return group if group <= MAX_ROW_TILE else MAX_ROW_TILE


def score_chains(rows: int, head_dim: int, accumulators: int = SCORE_ACCUMULATORS) -> int:
    """Independent accumulators per row over ``d`` (a power of two dividing ``head_dim``)."""
    chains = 1
    while rows * chains * 2 <= accumulators and head_dim % (chains * 2) == 0:
        chains *= 2
    return chains


def pool_shape(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int) -> list:
    """The pool's shape with a symbolic page count (see module docstring for the page layout)."""
    return [num_layers, "num_pages", 2, num_kv_heads, page_size * head_dim]


def kv_append(num_kv_heads: int, head_dim: int, page_size: int, dtype: str, kv_dtype: str):
    """Write each new token's K (transposed page layout) and V into its slot of one layer (rounded to
    ``kv_dtype``)."""
    Hkv, D, P = num_kv_heads, head_dim, page_size

    @T.macro
    def append_body(pool, k, v, slot, layer, n):
        for t in T.parallel(n):
            for h in T.serial(Hkv):
                for d in T.serial(D):
                    pool[layer, slot[t] // P, 0, h, d * P + slot[t] % P] = T.Cast(kv_dtype, k[t, h, d])
                for d in T.vectorized(D):
                    pool[layer, slot[t] // P, 1, h, (slot[t] % P) * D + d] = T.Cast(kv_dtype, v[t, h, d])

    return kv_append_entry("kv_append_cpu", append_body, Hkv, D, P, dtype, kv_dtype)


def paged_attention(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: str,
    kv_dtype: str,
    sparse: bool,
    score_accumulators: int = SCORE_ACCUMULATORS,
):
    """Tiled attention over the pool. Dense: keys ``0 .. pos``; sparse: the static list, then the window.
    Queries and output in ``dtype``, the pool in ``kv_dtype``, all arithmetic in fp32.
    ``score_accumulators``: the target's vector registers for a row tile's scores (``cpu_isa``)."""
    Hq, Hkv, D, P = num_heads, num_kv_heads, head_dim, page_size
    G = Hq // Hkv
    KB = KEY_BLOCK
    RT = row_tile(G)
    CH = score_chains(RT, D, score_accumulators)
    line_values = CACHE_LINE // np.dtype(kv_dtype).itemsize
    prefetch_lines = -(-P * D // line_values)  # cache lines of one page of K (or V) of one KV head
    ROWS_MAX = QUERY_TILE * G + RT  # rows of a query tile, plus the padding of its last row tile
    if P != KB:
        raise ValueError(f"the CPU attention kernel needs page_size == {KB}")
    scale = LOG2E / math.sqrt(D)

    def chain_sum(part, r, j):
        total = part[0, r, j]
        for c in range(1, CH):
            total = total + part[c, r, j]
        return total

    def load_or_zero(buf, b):
        return 0 if buf is None else buf[b]

    def key_position(static_pos, b, layer, kh, idx, n_static, w0):
        """Position of the ``idx``-th key of the view: the static list first, then ``w0, w0 + 1, ...``."""
        if static_pos is None:
            return idx
        return T.if_then_else(idx < n_static, static_pos[b, layer, kh, idx], w0 + idx - n_static)

    def key(pool, kt, layer, page_table, b, blk, kh, d, j):
        """Key ``j`` of the current block, feature ``d``."""
        if sparse:
            return kt[d, j]
        return T.Cast("float32", pool[layer, page_table[b, blk], 0, kh, d * P + j])

    def value(pool, kslot, layer, page_table, b, blk, kh, j, d):
        """Value ``j`` of the current block, feature ``d``."""
        if sparse:
            return T.Cast("float32", pool[layer, kslot[j] // P, 1, kh, kslot[j] % P * D + d])
        return T.Cast("float32", pool[layer, page_table[b, blk], 1, kh, j * D + d])

    def split_count(items, max_pages):
        """Key ranges per (query tile, KV head) item: enough for about ``PARALLEL_ITEMS`` items in all, each
        range at least ``MIN_SPLIT_BLOCKS`` blocks; 1 for the sparse view (its keys are few)."""
        if sparse:
            return 1
        wanted = (PARALLEL_ITEMS + items - 1) // items
        return T.max(1, T.min(T.min(MAX_SPLITS, max_pages // MIN_SPLIT_BLOCKS), wanted))

    @T.macro
    def body(
        q, pool, page_table, token_seq, token_pos, query_tiles, out, layer,
        static_pos, static_len, window_start, _num_tiles,
    ):  # fmt: skip
        items: T.let[T.int32] = query_tiles.shape[0] * Hkv
        max_pages = page_table.shape[1]
        splits: T.let[T.int32] = split_count(items, max_pages)
        split_blocks: T.let[T.int32] = (max_pages + splits - 1) // splits
        # Partial results of split items, by (item, key range, row): max and sum of the row's exp2 scores, and
        # its output not yet divided by the sum.
        scratch: T.let[T.int32] = T.Select(splits > 1, items * splits * ROWS_MAX, 1)
        part_stat = T.alloc_buffer((scratch, 2), "float32")
        part_acc = T.alloc_buffer((scratch, D), "float32")
        for item in T.parallel(items * splits):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                qf = T.sblock_alloc_buffer((ROWS_MAX, D), "float32")
                acc = T.sblock_alloc_buffer((ROWS_MAX, D), "float32")
                row_max = T.sblock_alloc_buffer((ROWS_MAX,), "float32")
                row_sum = T.sblock_alloc_buffer((ROWS_MAX, KB), "float32")  # per-lane partial sums
                row_pos = T.sblock_alloc_buffer((ROWS_MAX,), "int32")
                part = T.sblock_alloc_buffer((CH, RT, KB), "float32")
                s = T.sblock_alloc_buffer((RT, KB), "float32")
                tree = T.sblock_alloc_buffer((KB // 2,), "float32")
                kt = T.sblock_alloc_buffer((D, KB), "float32")
                kpos = T.sblock_alloc_buffer((KB,), "int32")
                kslot = T.sblock_alloc_buffer((KB,), "int32")
                step = T.sblock_alloc_buffer((RT, 2), "float32")  # per row: [new max, rescale factor]
                tile: T.let[T.int32] = item // (Hkv * splits)
                kh: T.let[T.int32] = item // splits % Hkv
                r0: T.let[T.int32] = query_tiles[tile, 0]
                rows: T.let[T.int32] = query_tiles[tile, 1] - r0
                b: T.let[T.int32] = token_seq[r0]
                n_static: T.let[T.int32] = load_or_zero(static_len, b)
                w0: T.let[T.int32] = load_or_zero(window_start, b)
                n_keys: T.let[T.int32] = n_static + token_pos[r0 + rows - 1] - w0 + 1
                n_tiles: T.let[T.int32] = (rows * G + RT - 1) // RT
                n_blocks: T.let[T.int32] = (n_keys + KB - 1) // KB
                blk_lo: T.let[T.int32] = item % splits * split_blocks
                blk_hi: T.let[T.int32] = T.min(n_blocks, blk_lo + split_blocks)
                # Rows are (token, head of the group); padding rows of the last row tile repeat the last row.
                for m in T.serial(n_tiles * RT):
                    mc: T.let[T.int32] = T.min(m, rows * G - 1)
                    row_max[m] = T.float32(NEG_INF)
                    for j in T.vectorized(KB):
                        row_sum[m, j] = T.float32(0)
                    row_pos[m] = token_pos[r0 + mc // G]
                    for d in T.vectorized(D):
                        qf[m, d] = T.Cast("float32", q[r0 + mc // G, kh * G + mc % G, d]) * T.float32(scale)
                        acc[m, d] = T.float32(0)
                for bi in T.serial(T.max(blk_hi - blk_lo, 0)):
                    blk: T.let[T.int32] = blk_lo + bi
                    if not sparse:
                        # Software prefetch of a later page: hardware prefetchers stop at 4 KB pages.
                        if blk + PREFETCH_PAGES < n_blocks:
                            for line in T.serial(prefetch_lines):
                                for kv in T.unroll(2):
                                    T.evaluate(
                                        T.call_llvm_intrin(
                                            "void",
                                            "llvm.prefetch.p0",
                                            T.address_of(
                                                pool[
                                                    layer,
                                                    page_table[b, blk + PREFETCH_PAGES],
                                                    kv,
                                                    kh,
                                                    line * line_values,
                                                ]
                                            ),
                                            T.int32(PREFETCH_READ),
                                            T.int32(PREFETCH_LOCALITY),
                                            T.int32(PREFETCH_DATA),
                                        )
                                    )
                    for j in T.serial(KB):
                        kpos[j] = T.if_then_else(blk * KB + j < n_keys, blk * KB + j, 2147483647)
                    if sparse:
                        # Gather the block's keys into kt[D, KB]; the dense view reads its page in place.
                        for j in T.serial(KB):
                            idx: T.let[T.int32] = T.min(blk * KB + j, n_keys - 1)
                            pos: T.let[T.int32] = key_position(static_pos, b, layer, kh, idx, n_static, w0)
                            kpos[j] = T.if_then_else(blk * KB + j < n_keys, pos, 2147483647)
                            kslot[j] = page_table[b, pos // P] * P + pos % P
                        for d in T.serial(D):
                            for j in T.serial(KB):
                                kt[d, j] = T.Cast(
                                    "float32", pool[layer, kslot[j] // P, 0, kh, d * P + kslot[j] % P]
                                )
                    for mt in T.serial(n_tiles):
                        # Scores of RT rows: each key vector loaded feeds RT x CH independent accumulators.
                        for c in T.unroll(CH):
                            for r in T.unroll(RT):
                                for j in T.vectorized(KB):
                                    part[c, r, j] = T.float32(0)
                        for dc in T.serial(D // CH):
                            for c in T.unroll(CH):
                                for r in T.unroll(RT):
                                    for j in T.vectorized(KB):
                                        part[c, r, j] = part[c, r, j] + qf[mt * RT + r, dc * CH + c] * key(
                                            pool, kt, layer, page_table, b, blk, kh, dc * CH + c, j
                                        )
                        for r in T.unroll(RT):
                            for j in T.vectorized(KB):
                                s[r, j] = T.Select(
                                    kpos[j] <= row_pos[mt * RT + r],
                                    chain_sum(part, r, j),
                                    T.float32(NEG_INF),
                                )
                            # Block maximum by halving (vector max instead of a serial chain).
                            for j in T.vectorized(KB // 2):
                                tree[j] = T.max(s[r, j], s[r, j + KB // 2])
                            for j in T.vectorized(KB // 4):
                                tree[j] = T.max(tree[j], tree[j + KB // 4])
                            for j in T.vectorized(KB // 8):
                                tree[j] = T.max(tree[j], tree[j + KB // 8])
                            step[r, 0] = T.max(row_max[mt * RT + r], T.max(tree[0], tree[1]))
                            step[r, 1] = fast_exp2(row_max[mt * RT + r] - step[r, 0])
                            row_max[mt * RT + r] = step[r, 0]
                            # Masked keys add nothing, even to a row that has no key in this range yet.
                            for j in T.vectorized(KB):
                                s[r, j] = T.Select(
                                    kpos[j] <= row_pos[mt * RT + r],
                                    fast_exp2(s[r, j] - step[r, 0]),
                                    T.float32(0),
                                )
                                row_sum[mt * RT + r, j] = row_sum[mt * RT + r, j] * step[r, 1] + s[r, j]
                            for d in T.vectorized(D):
                                acc[mt * RT + r, d] = acc[mt * RT + r, d] * step[r, 1]
                        # Values: each value vector loaded feeds the RT rows' accumulators.
                        if n_keys - blk * KB >= KB:  # a full block, unrolled: acc stays in registers
                            for j in T.unroll(KB):
                                for r in T.unroll(RT):
                                    for d in T.vectorized(D):
                                        acc[mt * RT + r, d] = acc[mt * RT + r, d] + s[r, j] * value(
                                            pool, kslot, layer, page_table, b, blk, kh, j, d
                                        )
                        else:
                            for j in T.serial(n_keys - blk * KB):  # never touch unwritten slots
                                for r in T.unroll(RT):
                                    for d in T.vectorized(D):
                                        acc[mt * RT + r, d] = acc[mt * RT + r, d] + s[r, j] * value(
                                            pool, kslot, layer, page_table, b, blk, kh, j, d
                                        )
                for m in T.serial(rows * G):
                    step[0, 0] = T.float32(0)
                    for j in T.serial(KB):
                        step[0, 0] = step[0, 0] + row_sum[m, j]
                    if splits == 1:
                        for d in T.vectorized(D):
                            out[r0 + m // G, kh * G + m % G, d] = T.Cast(dtype, acc[m, d] / step[0, 0])
                    else:
                        part_stat[item * ROWS_MAX + m, 0] = row_max[m]
                        part_stat[item * ROWS_MAX + m, 1] = step[0, 0]
                        for d in T.vectorized(D):
                            part_acc[item * ROWS_MAX + m, d] = acc[m, d]
        if splits > 1:
            # Merge each row's key ranges: rescale every range's sum and output to the row's overall max.
            for item in T.parallel(items):
                with T.sblock("merge"):
                    T.reads()
                    T.writes()
                    stat = T.sblock_alloc_buffer((3,), "float32")  # [max, sum, this range's scale]
                    merged = T.sblock_alloc_buffer((D,), "float32")
                    tile: T.let[T.int32] = item // Hkv
                    kh: T.let[T.int32] = item % Hkv
                    r0: T.let[T.int32] = query_tiles[tile, 0]
                    rows: T.let[T.int32] = query_tiles[tile, 1] - r0
                    for m in T.serial(rows * G):
                        stat[0] = T.float32(NEG_INF)
                        for sp in T.serial(splits):
                            stat[0] = T.max(stat[0], part_stat[(item * splits + sp) * ROWS_MAX + m, 0])
                        stat[1] = T.float32(0)
                        for d in T.vectorized(D):
                            merged[d] = T.float32(0)
                        for sp in T.serial(splits):
                            part: T.let[T.int32] = (item * splits + sp) * ROWS_MAX + m
                            stat[2] = fast_exp2(part_stat[part, 0] - stat[0])
                            stat[1] = stat[1] + part_stat[part, 1] * stat[2]
                            for d in T.vectorized(D):
                                merged[d] = merged[d] + part_acc[part, d] * stat[2]
                        for d in T.vectorized(D):
                            out[r0 + m // G, kh * G + m % G, d] = T.Cast(dtype, merged[d] / stat[1])

    name = "sparse_attention_cpu" if sparse else "dense_attention_cpu"
    return paged_attention_entry(name, body, Hq, Hkv, D, P, dtype, kv_dtype, sparse)


def attention_scores(
    num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: str, kv_dtype: str
):
    """SnapKV scores: for each row and KV head, the softmax attention each key position receives, summed over
    the row's query tokens and the query heads of the GQA group (dense view, causal)."""
    Hq, Hkv, D, P = num_heads, num_kv_heads, head_dim, page_size
    G = Hq // Hkv
    scale = LOG2E / math.sqrt(D)

    @T.macro
    def scores_body(q, pool, page_table, token_seq, token_pos, layer, scores, n, batch, max_pages):
        for item in T.parallel(batch * Hkv):
            with T.sblock("scores"):
                T.reads()
                T.writes()
                qf = T.sblock_alloc_buffer((D,), "float32")
                s = T.sblock_alloc_buffer((P,), "float32")
                stat = T.sblock_alloc_buffer((2,), "float32")  # [max, sum] of one query's scores
                b: T.let[T.int32] = item // Hkv
                kh: T.let[T.int32] = item % Hkv
                for j in T.serial(max_pages * P):
                    scores[b, kh, j] = T.float32(0)
                for t in T.serial(n):
                    if token_seq[t] == b:
                        for g in T.serial(G):
                            for d in T.vectorized(D):
                                qf[d] = T.Cast("float32", q[t, kh * G + g, d]) * T.float32(scale)
                            stat[0] = T.float32(NEG_INF)
                            stat[1] = T.float32(0)
                            for pass_ in T.serial(2):  # pass 0: max and sum; pass 1: add probabilities
                                for blk in T.serial(token_pos[t] // P + 1):
                                    for j in T.vectorized(P):
                                        s[j] = T.float32(0)
                                    for d in T.serial(D):
                                        for j in T.vectorized(P):
                                            s[j] = s[j] + qf[d] * T.Cast(
                                                "float32", pool[layer, page_table[b, blk], 0, kh, d * P + j]
                                            )
                                    for j in T.serial(P):
                                        if blk * P + j <= token_pos[t]:
                                            if pass_ == 0:
                                                stat[1] = stat[1] * fast_exp2(
                                                    stat[0] - T.max(stat[0], s[j])
                                                ) + fast_exp2(s[j] - T.max(stat[0], s[j]))
                                                stat[0] = T.max(stat[0], s[j])
                                            else:
                                                scores[b, kh, blk * P + j] = (
                                                    scores[b, kh, blk * P + j]
                                                    + fast_exp2(s[j] - stat[0]) / stat[1]
                                                )

    return attention_scores_entry("attention_scores_cpu", scores_body, Hq, Hkv, D, P, dtype, kv_dtype)
