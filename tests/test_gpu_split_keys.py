"""The GPU attention kernel's key split (flash-decoding) on PoCL against numpy: batch 1 and 2 with a few
thousand keys over many pages, dense and sparse views, decode (1 row) and verify (5 rows), GQA, the query
heads of a group split over blocks, and the same kernel with the split turned off.

The kernels are the ones ``--target pocl`` ships: scheduled for CUDA, generated as OpenCL C, launched on PoCL
from their kernel table (``compile.opencl``, ``runtime.opencl``). Float32 only (PoCL has no fp16 here).
"""

from __future__ import annotations

import numpy as np
import pocl_kernels
import pytest
import tvm
from pocl_kernels import needs_pocl, tensor
from test_attention_op import reference

from mlc_magicdec.compile.attention import PAGE_SIZE
from mlc_magicdec.runtime.runner import query_tiles
from mlc_magicdec.schedules import gpu_attention
from mlc_magicdec.schedules.gpu import unbound_kernels

pytestmark = needs_pocl

HQ, HKV, D, LAYERS = 6, 2, 32, 2  # GQA groups of 3 query heads
LAYER = 1
ONE_HEAD_LIMIT = 16 * 1024  # shared memory that fits one query head of a group per block (not three)
ATOL, RTOL = 2e-5, 1e-4
# 5 rows at positions 2076..2080: the last key range (ranges of 160 keys here) starts at key 2080, so only the
# last row sees a key of it
LATE_RANGE_LENGTH = 2081


def build(func: tvm.tirx.PrimFunc):
    """``func`` built for PoCL (``pocl_kernels.build``), checked first to bind every block to threads."""
    assert unbound_kernels(tvm.IRModule({"main": func})) == []
    return pocl_kernels.build(func)


def splits_of(seq_rows: np.ndarray, max_pages: int, heads: int = HQ, limit: int | None = None) -> int:
    """Key ranges the kernel picks for these rows (one query tile per ``QUERY_TILE`` rows of a sequence)."""
    heads_per_block, _ = gpu_attention.block_shape(
        heads // HKV, D, "float32", "float32", limit or gpu_attention.CUDA_STATIC_SHARED
    )
    blocks = len(query_tiles(seq_rows)) * HKV * (heads // HKV // heads_per_block)
    return int(gpu_attention.split_count(blocks, max_pages * PAGE_SIZE))


def make_batch(rng, lengths: list[int], new_per_seq: int):
    """Random K/V of sequences of ``lengths`` in a pool with scattered pages (GPU layout: row-major), the
    page table, and the rows (the last ``new_per_seq`` positions of each sequence)."""
    pages = [-(-n // PAGE_SIZE) for n in lengths]
    num_pages = sum(pages) + 3
    perm = rng.permutation(num_pages)
    page_table = np.zeros((len(lengths), max(pages) + 2), np.int32)  # wider than any sequence needs
    starts = np.cumsum([0, *pages])
    for b, k in enumerate(pages):
        page_table[b, :k] = perm[starts[b] : starts[b] + k]
    keys = [rng.standard_normal((n, HKV, D)).astype(np.float32) for n in lengths]
    values = [rng.standard_normal((n, HKV, D)).astype(np.float32) for n in lengths]
    pool = np.full((LAYERS, num_pages, 2, HKV, PAGE_SIZE * D), np.nan, np.float32)
    slots = pool.reshape(LAYERS, num_pages, 2, HKV, PAGE_SIZE, D)  # a view: [.., page, K/V, head, slot, d]
    for b, (k, v) in enumerate(zip(keys, values)):
        pos = np.arange(len(k))
        page, slot = page_table[b, pos // PAGE_SIZE], pos % PAGE_SIZE
        for layer in range(LAYERS):
            slots[layer, page, 0, :, slot] = k
            slots[layer, page, 1, :, slot] = v
    seq_rows = np.repeat(np.arange(len(lengths)), new_per_seq).astype(np.int32)
    positions = np.concatenate([np.arange(n - new_per_seq, n) for n in lengths]).astype(np.int32)
    return pool, page_table, keys, values, seq_rows, positions


def run_dense(kernel, lengths: list[int], new_per_seq: int, heads: int, seed: int):
    """The dense kernel's output and numpy's, and the page table's width."""
    rng = np.random.default_rng(seed)
    pool, page_table, keys, values, seq_rows, positions = make_batch(rng, lengths, new_per_seq)
    q = rng.standard_normal((len(seq_rows), heads, D)).astype(np.float32)
    out = tvm.runtime.empty(q.shape, "float32", pocl_kernels.DEVICE)
    args = (pool, page_table, seq_rows, positions, query_tiles(seq_rows))
    kernel(tensor(q), *map(tensor, args), LAYER, out)
    lists = [(int(b), [np.arange(p + 1)] * HKV) for b, p in zip(seq_rows, positions)]
    return out.numpy(), reference(q, keys, values, lists), seq_rows, page_table.shape[1]


@pytest.mark.parametrize(
    ("lengths", "new_per_seq"), [([2900], 1), ([1000, 3000], 1), ([LATE_RANGE_LENGTH], 5), ([1200, 2500], 4)]
)
def test_dense_split_matches_numpy(lengths, new_per_seq):
    """Decode and verify rows of one or two sequences, each (tile, KV head) split into key ranges."""
    kernel = build(
        gpu_attention.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", "float32", False)
    )
    got, want, seq_rows, max_pages = run_dense(kernel, lengths, new_per_seq, HQ, sum(lengths) + new_per_seq)
    assert splits_of(seq_rows, max_pages) > 1
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_dense_split_with_one_query_head_per_block():
    """A group's 3 query heads in 3 blocks (little shared memory), each of them split over the keys."""
    func = gpu_attention.paged_attention(
        HQ, HKV, D, PAGE_SIZE, "float32", "float32", False, shared_limit=ONE_HEAD_LIMIT
    )
    kernel = build(func)
    got, want, seq_rows, max_pages = run_dense(kernel, [1700, 900], 5, HQ, 7)
    assert splits_of(seq_rows, max_pages, limit=ONE_HEAD_LIMIT) > 1
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_dense_without_split_matches_numpy(monkeypatch):
    """Enough blocks already (a target of one block): one range, the output written directly."""
    monkeypatch.setattr(gpu_attention, "TARGET_BLOCKS", 1)
    kernel = build(
        gpu_attention.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", "float32", False)
    )
    got, want, seq_rows, max_pages = run_dense(kernel, [1500], 4, HQ, 3)
    assert splits_of(seq_rows, max_pages) == 1
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("lengths", "new_per_seq"), [([3000], 1), ([2600], 4), ([1100, 2800], 1), ([2000, 1400], 5)]
)
def test_sparse_split_matches_numpy(lengths, new_per_seq):
    """A static list per (sequence, layer, KV head), then a window: far fewer keys than the page table's
    positions, so the last ranges of a split hold no key."""
    kernel = build(gpu_attention.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", "float32", True))
    rng = np.random.default_rng(sum(lengths) * new_per_seq)
    pool, page_table, keys, values, seq_rows, positions = make_batch(rng, lengths, new_per_seq)
    budgets = [400, 130][: len(lengths)]
    windows = [300, 60][: len(lengths)]  # window start back from the first query
    max_static = max(budgets) + 3
    static_pos = np.full((len(lengths), LAYERS, HKV, max_static), -1, np.int32)
    window_start = np.array([n - new_per_seq - w for n, w in zip(lengths, windows)], np.int32)
    for b in range(len(lengths)):
        for layer in range(LAYERS):
            for h in range(HKV):
                chosen = np.sort(rng.choice(window_start[b], budgets[b], replace=False))
                static_pos[b, layer, h, : budgets[b]] = chosen
    q = rng.standard_normal((len(seq_rows), HQ, D)).astype(np.float32)
    out = tvm.runtime.empty(q.shape, "float32", pocl_kernels.DEVICE)
    args = (pool, page_table, seq_rows, positions, query_tiles(seq_rows), static_pos)
    kernel(tensor(q), *map(tensor, args), tensor(np.array(budgets, np.int32)),
           tensor(window_start), LAYER, out)  # fmt: skip
    lists = []
    for b, p in zip(seq_rows, positions):
        window = np.arange(window_start[b], p + 1)
        lists.append(
            (int(b), [np.concatenate([static_pos[b, LAYER, h, : budgets[b]], window]) for h in range(HKV)])
        )
    assert splits_of(seq_rows, page_table.shape[1]) > 1
    np.testing.assert_allclose(out.numpy(), reference(q, keys, values, lists), atol=ATOL, rtol=RTOL)
