"""The model runner: one artifact's compiled functions called over its paged KV pool, numpy in and out.

The engine drives it for the target (and a small draft model's own runner); calibration, step timing and
the kernel profiler time steps through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import tvm

from ..constants import KV_TENSORS, PAGE_SIZE, QUERY_TILE
from .artifact import Artifact
from .kv import KVPoolExhausted, PagePool

MAX_POOL_ELEMENTS = 2**31 - 1  # the attention and append kernels index the pool with int32 offsets
SYNTHETIC_SEQ_BASE = 1 << 30  # sequence ids for synthetic timing sequences (never clash with real ones)


def query_tiles(seq_rows: np.ndarray) -> np.ndarray:
    """``[first, end)`` runs of at most ``QUERY_TILE`` consecutive tokens of the same row."""
    change = np.flatnonzero(np.diff(seq_rows)) + 1
    bounds = [0, *change.tolist(), len(seq_rows)]
    tiles = [
        (s, min(s + QUERY_TILE, end))
        for start, end in zip(bounds, bounds[1:])
        for s in range(start, end, QUERY_TILE)
    ]
    return np.asarray(tiles, dtype=np.int32)


class ModelRunner:
    """Calls one artifact's compiled functions over the shared paged pool; numpy in, numpy out."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.cfg = artifact.model
        self.device = artifact.device
        self.pool_tensor: tvm.runtime.Tensor | None = None
        self.pages: PagePool | None = None

    def ensure_pool(self, free_pages: int, capacity: int | None = None) -> PagePool:
        """Make sure ``free_pages`` pages are free, allocating a pool (of ``capacity`` pages if fixed)."""
        pages = self.pages
        if pages is not None and pages.free_pages >= free_pages:
            return pages
        if pages is not None and (capacity is not None or pages.free_pages < pages.num_pages):
            raise KVPoolExhausted(
                f"KV pool exhausted: {free_pages} pages needed, {pages.free_pages} free of "
                f"{pages.num_pages}; "
                f"release earlier prefilled batches, raise kv_capacity, or use a smaller batch"
            )
        num_pages = max(capacity or 0, free_pages)
        if num_pages > self.max_pages:
            raise KVPoolExhausted(
                f"a KV pool of {num_pages * PAGE_SIZE} tokens is over the {self.max_pages * PAGE_SIZE} the "
                f"kernels can index (32-bit offsets); use a smaller batch or kv_capacity"
            )
        c = self.cfg
        shape = (c.num_layers, num_pages, KV_TENSORS, c.num_kv_heads, PAGE_SIZE * c.head_dim)
        self.pool_tensor = None  # free the old pool first
        self.pool_tensor = tvm.runtime.empty(shape, self.artifact.kv_dtype, self.device)
        self.pages = PagePool(num_pages, PAGE_SIZE)
        return self.pages

    @property
    def max_pages(self) -> int:
        """The largest pool the kernels index with 32-bit offsets."""
        c = self.cfg
        return MAX_POOL_ELEMENTS // (c.num_layers * KV_TENSORS * c.num_kv_heads * PAGE_SIZE * c.head_dim)

    @contextmanager
    def synthetic_batch(self, batch: int, context: int, slack: int) -> Iterator[list[int]]:
        """``batch`` sequences of ``context`` tokens of zero KV (room for ``slack`` more each), for timing.

        The kernels do the same work whatever the values, so a batch of 16 x 8k is timed without
        prefilling 128k tokens. The pool is overwritten with zeros: use a runner that holds no sequence
        (the engine's own target before any prefill, or a fresh ``ModelRunner``). Yields the sequence ids;
        their pages are freed on exit.
        """
        ids = [SYNTHETIC_SEQ_BASE + i for i in range(batch)]
        pages = self.ensure_pool(batch * -(-(context + slack) // PAGE_SIZE))
        self.pool_tensor.copyfrom(np.zeros(self.pool_tensor.shape, dtype=self.artifact.kv_dtype))
        try:
            for s in ids:
                pages.add(s)
                pages.reserve(s, context + slack)
                pages.set_length(s, context)
            yield ids
        finally:
            for s in ids:
                if s in pages:
                    pages.remove(s)

    def _t(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    def forward(
        self,
        fn: str,
        tokens: np.ndarray,
        seq_rows: np.ndarray,
        positions: np.ndarray,
        seq_ids: list[int],
        *extra: np.ndarray,
    ) -> np.ndarray:
        """Run ``fn`` (prefill/decode/verify/draft) on new ``tokens`` of rows ``seq_rows`` of ``seq_ids``.

        Tokens are grouped by row in ascending order; ``extra`` are the function's further index arrays.
        """
        vm, params, pages = self.artifact.vm, self.artifact.params, self.pages
        slots = np.concatenate([pages.slots(s, positions[seq_rows == row]) for row, s in enumerate(seq_ids)])
        embeds = vm["embed"](self._t(tokens.astype(np.int32)), params)
        args = [
            embeds,
            self._t(slots.astype(np.int32)),
            self._t(seq_rows.astype(np.int32)),
            self._t(positions.astype(np.int32)),
            self._t(pages.page_table(seq_ids)),
            self._t(query_tiles(seq_rows)),
        ]
        args += [self._t(a) for a in extra]
        logits, self.pool_tensor = vm[fn](*args, self.pool_tensor, params)
        return logits.numpy()
