"""The model runner: one artifact's compiled functions called over its paged KV pool.

The engine drives it for the target (and a small draft model's own runner); calibration, step timing and
the kernel profiler time steps through it. Decoding keeps the logits on the device (``forward_device``) and
samples there (``call`` of the artifact's sampling functions, ``compile.sampling``); ``host_bytes`` counts
what the runner copies back to the host.
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
_NARROW = {np.dtype(np.int64): np.int32, np.dtype(np.float64): np.float32}  # how ``call`` sends numpy
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
    """Calls one artifact's compiled functions over the shared paged pool."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.cfg = artifact.model
        self.device = artifact.device
        self.pool_tensor: tvm.runtime.Tensor | None = None
        self.pages: PagePool | None = None
        self.host_bytes = 0  # bytes copied from the device to the host through ``to_host``

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

    def to_host(self, tensor: tvm.runtime.Tensor) -> np.ndarray:
        """``tensor`` copied to the host (counted in ``host_bytes``)."""
        array = tensor.numpy()
        self.host_bytes += array.nbytes
        return array

    @staticmethod
    def copy_row(dst: tvm.runtime.Tensor, dst_row: int, src: tvm.runtime.Tensor, src_row: int) -> None:
        """Copy row ``src_row`` of the 2-D ``src`` into row ``dst_row`` of ``dst``, on the device."""
        width, dtype = int(src.shape[1]), str(src.dtype)
        row_bytes = width * np.dtype(dtype).itemsize
        view = dst._create_view((1, width), dtype, relative_byte_offset=dst_row * row_bytes)
        view.copyfrom(src._create_view((1, width), dtype, relative_byte_offset=src_row * row_bytes))

    def call(self, fn: str, *args: np.ndarray | tvm.runtime.Tensor):
        """The artifact's parameter-free function ``fn`` (the sampling functions) on ``args``; numpy arrays
        are copied to the device (int64 as int32, float64 as float32), results stay there."""
        tensors = []
        for a in args:
            if not isinstance(a, tvm.runtime.Tensor):
                a = np.asarray(a)
                a = self._t(a.astype(_NARROW.get(a.dtype, a.dtype)))
            tensors.append(a)
        return self.artifact.vm[fn](*tensors)

    def forward_device(
        self,
        fn: str,
        tokens: np.ndarray,
        seq_rows: np.ndarray,
        positions: np.ndarray,
        seq_ids: list[int],
        *extra: np.ndarray,
    ) -> tvm.runtime.Tensor:
        """Run ``fn`` (prefill/decode/verify/draft) on new ``tokens`` of rows ``seq_rows`` of ``seq_ids``;
        returns its output (logits, or SnapKV's scores) on the device.

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
        out, self.pool_tensor = vm[fn](*args, self.pool_tensor, params)
        return out

    def greedy_step(self, *args) -> np.ndarray:
        """``forward_device`` and the argmax of every output row on the device: the work of a greedy step,
        whose token ids alone come to the host (what step timing measures)."""
        return self.to_host(self.call("argmax", self.forward_device(*args)))

    def forward(self, *args, **kwargs) -> np.ndarray:
        """``forward_device``, its output copied to the host."""
        return self.to_host(self.forward_device(*args, **kwargs))
