"""The paged attention op (dense and sparse views), KV append and the SnapKV scores against a numpy reference,
for both kernel sets: the CPU kernels built for this CPU (a float32 and a float16 pool), and the GPU kernels,
sized for CUDA's shared memory, generated as OpenCL and run on PoCL (a float32 pool: PoCL has no fp16).
Queries and arithmetic are float32 either way."""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from collections.abc import Callable

import numpy as np
import pytest
import tvm
from pocl_kernels import BARRIER, POCL, needs_pocl
from pocl_kernels import build as build_pocl
from pocl_kernels import tensor as pocl_tensor

from mlc_magicdec.compile.attention import PAGE_SIZE
from mlc_magicdec.compile.targets import host_llvm
from mlc_magicdec.runtime.runner import query_tiles
from mlc_magicdec.schedules import AttentionKernels, attention_kernels, cpu_attention, gpu_attention

HQ, HKV, D, LAYERS = 6, 2, 32, 2
LAYER = 1


def build(func):
    return tvm.compile(tvm.IRModule({"main": func}), target=host_llvm())["main"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """A kernel set, how its kernels are built, and how an array becomes a tensor on their device."""

    kernels: AttentionKernels
    build: Callable
    tensor: Callable[[np.ndarray], tvm.runtime.Tensor]

    def output(self, shape: tuple[int, ...]) -> tvm.runtime.Tensor:
        """A float32 output, NaN until the kernel writes it."""
        return self.tensor(np.full(shape, np.nan, np.float32))


BACKENDS = {
    "cpu": Backend(AttentionKernels(cpu_attention), build, tvm.runtime.tensor),
    "pocl": Backend(attention_kernels(POCL.target), build_pocl, pocl_tensor),
}
NO_FP16 = pytest.mark.skip(reason="PoCL has no fp16: the GPU kernels run a float32 pool there")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("cpu", "float32"), id="cpu-float32"),
        pytest.param(("cpu", "float16"), id="cpu-float16"),
        pytest.param(("pocl", "float32"), id="pocl-float32", marks=needs_pocl),
        pytest.param(("pocl", "float16"), id="pocl-float16", marks=NO_FP16),
    ],
)
def kernels(request):
    backend_name, kv = request.param
    backend = BACKENDS[backend_name]
    k = backend.kernels
    return {
        "backend": backend,
        "kv_dtype": kv,
        "append": backend.build(k.kv_append(HKV, D, PAGE_SIZE, "float32", kv)),
        "dense": backend.build(k.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", kv, False)),
        "sparse": backend.build(k.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", kv, True)),
    }


def probabilities(q_row, keys, positions):
    """Softmax of one query head's scores against ``keys[positions]`` (one KV head's keys)."""
    s = keys[positions] @ q_row / np.sqrt(D)
    p = np.exp(s - s.max())
    return p / p.sum()


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
            out[t, h] = probabilities(q[t, h], keys[b][:, kh], pos) @ values[b][pos, kh]
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
    backend = kernels["backend"]
    shape = (LAYERS, num_pages, 2, HKV, PAGE_SIZE * D)
    pool = backend.tensor(np.full(shape, np.nan, kernels["kv_dtype"]))
    for b, (k, v) in enumerate(zip(keys, values)):
        pos = np.arange(len(k))
        slots = (page_table[b, pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE).astype(np.int32)
        for layer in range(LAYERS):
            kernels["append"](pool, backend.tensor(k), backend.tensor(v), backend.tensor(slots), layer)
    return pool


def check_dense(kernels, dense, heads, lengths, new_per_seq, seed):
    """Run ``dense`` on the last ``new_per_seq`` tokens of random sequences; compare with numpy."""
    backend = kernels["backend"]
    rng = np.random.default_rng(seed)
    page_table, keys, values, seq_rows, positions, num_pages = make_batch(rng, lengths, new_per_seq)
    pool = fill_pool(kernels, page_table, keys, values, num_pages)
    q = rng.standard_normal((len(seq_rows), heads, D)).astype(np.float32)
    out = backend.output(q.shape)
    dense(
        backend.tensor(q),
        pool,
        backend.tensor(page_table),
        backend.tensor(seq_rows),
        backend.tensor(positions),
        backend.tensor(query_tiles(seq_rows)),
        LAYER,
        out,
    )
    lists = [(int(b), [np.arange(p + 1)] * HKV) for b, p in zip(seq_rows, positions)]
    np.testing.assert_allclose(out.numpy(), reference(q, keys, values, lists), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("new_per_seq", [1, 5, 20])
def test_dense_view_matches_numpy(kernels, new_per_seq):
    check_dense(kernels, kernels["dense"], HQ, [37, 100, 21, 64], new_per_seq, new_per_seq)


@pytest.mark.parametrize("new_per_seq", [1, 5])
def test_dense_view_over_many_pages(kernels, new_per_seq):
    """Sequences spanning dozens of scattered pages, next to a one-page one (many key blocks a query)."""
    check_dense(kernels, kernels["dense"], HQ, [700, 9, 333], new_per_seq, 30 + new_per_seq)


@pytest.mark.parametrize("new_per_seq", [1, 4])
def test_sparse_view_matches_numpy(kernels, new_per_seq):
    """Random static lists per (sequence, layer, KV head), different budgets per sequence, plus a window."""
    backend = kernels["backend"]
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
    out = backend.output(q.shape)
    kernels["sparse"](
        backend.tensor(q),
        pool,
        backend.tensor(page_table),
        backend.tensor(seq_rows),
        backend.tensor(positions),
        backend.tensor(query_tiles(seq_rows)),
        backend.tensor(static_pos),
        backend.tensor(np.array(budgets, np.int32)),
        backend.tensor(window_start),
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
    """GQA groups of other sizes than the fixture's (CPU: row tiles of the group, padding of the last tile;
    GPU: a group of 5 takes one-page key blocks, one of 8 is split over two blocks, in 48 KB of shared)."""
    backend, kv = kernels["backend"], kernels["kv_dtype"]
    dense = backend.build(backend.kernels.paged_attention(heads, HKV, D, PAGE_SIZE, "float32", kv, False))
    check_dense(kernels, dense, heads, [50, 33], 4, heads)


@pytest.mark.parametrize("min_blocks", [1, 2])
@pytest.mark.parametrize("new_per_seq", [1, 5])
def test_dense_view_with_split_keys(kernels, monkeypatch, min_blocks, new_per_seq):
    """Few items (2 sequences x 2 KV heads): each sequence's keys are split into ranges of ``min_blocks``
    pages (5 or 2 ranges here), merged afterwards. With 5 verify rows, the earliest rows see no key at all of
    the last range. (CPU kernels: ``MIN_SPLIT_BLOCKS`` key blocks a range; GPU: ``MIN_SPLIT_KEYS`` keys.)"""
    backend, kv = kernels["backend"], kernels["kv_dtype"]
    if backend.kernels.module is cpu_attention:
        monkeypatch.setattr(cpu_attention, "MIN_SPLIT_BLOCKS", min_blocks)
    else:
        monkeypatch.setattr(gpu_attention, "MIN_SPLIT_KEYS", min_blocks * PAGE_SIZE)
    dense = backend.build(backend.kernels.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", kv, False))
    check_dense(kernels, dense, HQ, [66, 35], new_per_seq, min_blocks)


def test_kv_append_writes_only_its_slots(kernels):
    """Each token's K and V land in its own page, KV head and layer, and nothing else is written (the
    layout inside a page is the kernel set's own; the attention tests check that reads agree with it)."""
    kv = kernels["kv_dtype"]
    rng = np.random.default_rng(5)
    page_table, keys, values, _, _, num_pages = make_batch(rng, [23, 40], 1)  # 23 tokens: a partial block
    pool = fill_pool(kernels, page_table, keys[:1], values[:1], num_pages).numpy()
    written = np.zeros(pool.shape[:4], bool)
    for kind, data in enumerate((keys[0], values[0])):
        for page in np.unique(page_table[0, : -(-len(data) // PAGE_SIZE)]):
            pos = [p for p in range(len(data)) if page_table[0, p // PAGE_SIZE] == page]
            for layer in range(LAYERS):
                for h in range(HKV):
                    got = pool[layer, page, kind, h]
                    expect = data[pos, h].astype(kv)
                    np.testing.assert_array_equal(np.sort(got[~np.isnan(got)]), np.sort(expect.ravel()))
                    written[layer, page, kind, h] = True
    assert np.isnan(pool[~written]).all()


@pytest.mark.parametrize("new_per_seq", [1, 6])
def test_attention_scores_match_numpy(kernels, new_per_seq):
    """SnapKV scores: each position's attention from its row's query tokens, summed over the tokens and the
    query heads of each KV head's group; zero past each row's last query and in its unused pages."""
    backend, kv = kernels["backend"], kernels["kv_dtype"]
    scores = backend.build(backend.kernels.attention_scores(HQ, HKV, D, PAGE_SIZE, "float32", kv))
    rng = np.random.default_rng(20 + new_per_seq)
    page_table, keys, values, seq_rows, positions, num_pages = make_batch(rng, [37, 300, 9], new_per_seq)
    pool = fill_pool(kernels, page_table, keys, values, num_pages)
    q = rng.standard_normal((len(seq_rows), HQ, D)).astype(np.float32)
    shape = (page_table.shape[0], HKV, page_table.shape[1] * PAGE_SIZE)
    out = backend.output(shape)
    scores(
        backend.tensor(q),
        pool,
        backend.tensor(page_table),
        backend.tensor(seq_rows),
        backend.tensor(positions),
        LAYER,
        out,
    )
    expect = np.zeros(shape)
    group = HQ // HKV
    for t, (b, p) in enumerate(zip(seq_rows, positions)):
        for h in range(HQ):
            expect[b, h // group, : p + 1] += probabilities(q[t, h], keys[b][:, h // group], np.arange(p + 1))
    np.testing.assert_allclose(out.numpy(), expect, atol=2e-5, rtol=1e-4)


WRONG_OUTPUT = 3  # exit code of the child process below when the kernel's output is wrong
CHILD_TIMEOUT = 300  # seconds


def without_barriers(source: str) -> str:
    assert BARRIER in source
    return source.replace(BARRIER, "")


def check_attention_without_barriers() -> None:
    """Run the GPU dense view with every work-group barrier deleted from its OpenCL; exit ``WRONG_OUTPUT``
    if the output is wrong."""
    backend = BACKENDS["pocl"]
    k = backend.kernels
    kernels = {
        "backend": backend,
        "kv_dtype": "float32",
        "append": build_pocl(k.kv_append(HKV, D, PAGE_SIZE, "float32", "float32")),
    }
    dense = k.paged_attention(HQ, HKV, D, PAGE_SIZE, "float32", "float32", False)
    broken = build_pocl(dense, edit=without_barriers)
    try:
        check_dense(kernels, broken, HQ, [37, 100, 21, 64], 5, 5)
    except AssertionError:
        sys.exit(WRONG_OUTPUT)


@needs_pocl
def test_gpu_attention_without_barriers_fails():
    """The PoCL check can fail: without barriers, the threads of a block read shared memory that the others
    have not written yet. The kernel runs in a child process: shared memory that TVM reuses for another
    buffer may then hold a float where an address should be, and the kernel may crash instead."""
    child = multiprocessing.get_context("spawn").Process(target=check_attention_without_barriers)
    child.start()
    child.join(CHILD_TIMEOUT)
    if child.is_alive():
        child.kill()
    assert child.exitcode == WRONG_OUTPUT or (child.exitcode or 0) < 0  # wrong output, or killed by a signal


def test_query_tiles_split_runs():
    rows = np.array([0, 0, 0, 1] + [2] * 40, np.int32)
    tiles = query_tiles(rows)
    assert tiles.tolist() == [[0, 3], [3, 4], [4, 20], [20, 36], [36, 44]]
