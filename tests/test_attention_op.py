"""The paged attention op (dense and sparse views) and KV append against a numpy reference, with a float32 and
a float16 pool (float32 queries and arithmetic either way)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from mlc_magicdec.compile.attention import PAGE_SIZE
from mlc_magicdec.compile.targets import host_llvm
from mlc_magicdec.runtime.runner import query_tiles
from mlc_magicdec.schedules import cpu_attention

HQ, HKV, D, LAYERS = 6, 2, 32, 2
LAYER = 1


def build(func):
    return tvm.compile(tvm.IRModule({"main": func}), target=host_llvm())["main"]


@pytest.fixture(scope="module", params=["float32", "float16"])
def kernels(request):
    kv = request.param
    return {
        "kv_dtype": kv,
        "append": build(cpu_attention.kv_append(HKV, D, PAGE_SIZE, "float32", kv)),
        "dense": build(cpu_attention.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", kv, False)),
        "sparse": build(cpu_attention.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", kv, True)),
    }


def reference(q, keys, values, key_lists):
    """Softmax attention of q[n, HQ, D] over keys[b][pos, HKV, D] at the positions in key_lists[t][h]."""
    out = np.zeros_like(q, dtype=np.float64)
    heads = q.shape[1]
    group = heads // HKV
    for t in range(q.shape[0]):
        b, positions = key_lists[t]
        for h in range(heads):
            kh = h // group
            pos = positions[kh]
            s = keys[b][pos, kh] @ q[t, h] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ values[b][pos, kh]
    return out


def make_batch(rng, lengths, new_per_seq):
    """A pool holding random K/V for sequences of ``lengths`` (pages scattered), via the append kernel."""
    num_pages = sum(-(-n // PAGE_SIZE) for n in lengths) + 3
    perm = rng.permutation(num_pages)
    tables, start = [], 0
    for n in lengths:
        k = -(-n // PAGE_SIZE)
        tables.append(perm[start : start + k])
        start += k
    width = max(len(t) for t in tables)
    page_table = np.zeros((len(lengths), width), np.int32)
    for i, t in enumerate(tables):
        page_table[i, : len(t)] = t
    # values a float16 pool holds exactly, so both pools must match the reference as closely
    keys = [rng.standard_normal((n, HKV, D)).astype(np.float16).astype(np.float32) for n in lengths]
    values = [rng.standard_normal((n, HKV, D)).astype(np.float16).astype(np.float32) for n in lengths]
    # queries: the last new_per_seq positions of each sequence
    seq_rows = np.concatenate([np.full(new_per_seq, i) for i in range(len(lengths))]).astype(np.int32)
    positions = np.concatenate([np.arange(n - new_per_seq, n) for n in lengths]).astype(np.int32)
    return page_table, keys, values, seq_rows, positions, num_pages


def fill_pool(kernels, page_table, keys, values, num_pages):
    shape = (LAYERS, num_pages, 2, HKV, PAGE_SIZE * D)
    pool = tvm.runtime.tensor(np.full(shape, np.nan, kernels["kv_dtype"]))
    for b, (k, v) in enumerate(zip(keys, values)):
        pos = np.arange(len(k))
        slots = (page_table[b, pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE).astype(np.int32)
        for layer in range(LAYERS):
            kernels["append"](
                pool, tvm.runtime.tensor(k), tvm.runtime.tensor(v), tvm.runtime.tensor(slots), layer
            )
    return pool


def check_dense(kernels, dense, heads, lengths, new_per_seq, seed):
    """Run ``dense`` on the last ``new_per_seq`` tokens of random sequences; compare with numpy."""
    rng = np.random.default_rng(seed)
    page_table, keys, values, seq_rows, positions, num_pages = make_batch(rng, lengths, new_per_seq)
    pool = fill_pool(kernels, page_table, keys, values, num_pages)
    q = rng.standard_normal((len(seq_rows), heads, D)).astype(np.float32)
    out = tvm.runtime.empty(q.shape, "float32")
    dense(
        tvm.runtime.tensor(q),
        pool,
        tvm.runtime.tensor(page_table),
        tvm.runtime.tensor(seq_rows),
        tvm.runtime.tensor(positions),
        tvm.runtime.tensor(query_tiles(seq_rows)),
        LAYER,
        out,
    )
    lists = [(int(b), [np.arange(p + 1)] * HKV) for b, p in zip(seq_rows, positions)]
    np.testing.assert_allclose(out.numpy(), reference(q, keys, values, lists), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("new_per_seq", [1, 5, 20])
def test_dense_view_matches_numpy(kernels, new_per_seq):
    check_dense(kernels, kernels["dense"], HQ, [37, 100, 21, 64], new_per_seq, new_per_seq)


@pytest.mark.parametrize("new_per_seq", [1, 4])
def test_sparse_view_matches_numpy(kernels, new_per_seq):
    """Random static lists per (sequence, layer, KV head), different budgets per sequence, plus a window."""
    rng = np.random.default_rng(10 + new_per_seq)
    lengths = [300, 90, 141]
    budgets = [40, 7, 0]  # static entries per sequence
    windows = [20, 30, 141 - new_per_seq]  # window start offset back from the first query
    page_table, keys, values, seq_rows, positions, num_pages = make_batch(rng, lengths, new_per_seq)
    pool = fill_pool(kernels, page_table, keys, values, num_pages)
    max_static = max(budgets) + 3
    static_pos = np.full((len(lengths), LAYERS, HKV, max_static), -1, np.int32)
    window_start = np.zeros(len(lengths), np.int32)
    for b, n in enumerate(lengths):
        first_query = n - new_per_seq
        window_start[b] = first_query - windows[b]
        for layer in range(LAYERS):
            for h in range(HKV):
                chosen = np.sort(rng.choice(window_start[b], budgets[b], replace=False))
                static_pos[b, layer, h, : budgets[b]] = chosen
    q = rng.standard_normal((len(seq_rows), HQ, D)).astype(np.float32)
    out = tvm.runtime.empty(q.shape, "float32")
    kernels["sparse"](
        tvm.runtime.tensor(q),
        pool,
        tvm.runtime.tensor(page_table),
        tvm.runtime.tensor(seq_rows),
        tvm.runtime.tensor(positions),
        tvm.runtime.tensor(query_tiles(seq_rows)),
        tvm.runtime.tensor(static_pos),
        tvm.runtime.tensor(np.array(budgets, np.int32)),
        tvm.runtime.tensor(window_start),
        LAYER,
        out,
    )
    lists = []
    for b, p in zip(seq_rows, positions):
        window = np.arange(window_start[b], p + 1)
        lists.append(
            (int(b), [np.concatenate([static_pos[b, LAYER, h, : budgets[b]], window]) for h in range(HKV)])
        )
    np.testing.assert_allclose(out.numpy(), reference(q, keys, values, lists), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("heads", [HKV, 5 * HKV, 8 * HKV])  # one row, a padded row tile, two row tiles
def test_dense_view_any_group_size(kernels, heads):
    """GQA groups of other sizes than the fixture's (row tiles of the group, padding of the last tile)."""
    kv = kernels["kv_dtype"]
    dense = build(cpu_attention.paged_attention(heads, HKV, D, PAGE_SIZE, "float32", kv, False))
    check_dense(kernels, dense, heads, [50, 33], 4, heads)


@pytest.mark.parametrize("min_blocks", [1, 2])
@pytest.mark.parametrize("new_per_seq", [1, 5])
def test_dense_view_with_split_keys(kernels, monkeypatch, min_blocks, new_per_seq):
    """Few items (2 sequences x 2 KV heads): each sequence's keys are split into ranges of ``min_blocks``
    pages (5 or 2 ranges here), merged afterwards. With 5 verify rows, the earliest rows see no key at all of
    the last range."""
    monkeypatch.setattr(cpu_attention, "MIN_SPLIT_BLOCKS", min_blocks)
    kv = kernels["kv_dtype"]
    dense = build(cpu_attention.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", kv, False))
    check_dense(kernels, dense, HQ, [66, 35], new_per_seq, min_blocks)


def test_query_tiles_split_runs():
    rows = np.array([0, 0, 0, 1] + [2] * 40, np.int32)
    tiles = query_tiles(rows)
    assert tiles.tolist() == [[0, 3], [3, 4], [4, 20], [20, 36], [36, 44]]
