"""The host side of the paged KV pool: page allocation, per-sequence page lists and lengths.

The device holds ``pool[layers, num_pages, 2, kv_heads, page_size, head_dim]``; this class decides which
pages each sequence owns and turns (sequence, position) into physical slots and page tables. Rolling back
rejected tokens is bookkeeping only: the length goes back and the next write overwrites the slots.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import UserError


class KVPoolExhausted(UserError, RuntimeError):
    """The pool has no free page left; the message is one line and says what to do."""


@dataclasses.dataclass
class _Sequence:
    pages: list[int] = dataclasses.field(default_factory=list)
    length: int = 0  # committed tokens


class PagePool:
    """Page allocator over ``num_pages`` pages of ``page_size`` slots."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))
        self._seqs: dict[int, _Sequence] = {}

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def add(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = _Sequence()

    def remove(self, seq_id: int) -> None:
        self._free.extend(reversed(self._seqs.pop(seq_id).pages))

    def length(self, seq_id: int) -> int:
        return self._seqs[seq_id].length

    def reserve(self, seq_id: int, capacity: int) -> None:
        """Make sure ``seq_id`` owns pages for ``capacity`` tokens."""
        seq = self._seqs[seq_id]
        need = self.pages_for(capacity) - len(seq.pages)
        if need > len(self._free):
            raise KVPoolExhausted(
                f"KV pool exhausted: {need} more pages needed, {len(self._free)} free of {self.num_pages}; "
                f"use a larger kv_capacity, a smaller batch or fewer new tokens"
            )
        for _ in range(max(need, 0)):
            seq.pages.append(self._free.pop())

    def set_length(self, seq_id: int, length: int) -> None:
        """Commit (or roll back to) ``length`` tokens."""
        seq = self._seqs[seq_id]
        if length > len(seq.pages) * self.page_size:
            raise ValueError(f"sequence {seq_id}: length {length} exceeds its reserved pages")
        seq.length = length

    def slots(self, seq_id: int, positions: np.ndarray) -> np.ndarray:
        """Physical slots of ``positions`` in ``seq_id`` (the pages must be reserved)."""
        pages = np.asarray(self._seqs[seq_id].pages, dtype=np.int32)
        positions = np.asarray(positions, dtype=np.int32)
        return pages[positions // self.page_size] * self.page_size + positions % self.page_size

    def page_table(self, seq_ids: list[int]) -> np.ndarray:
        """``[len(seq_ids), max_pages]`` int32 table of physical pages (padded with page 0)."""
        width = max((len(self._seqs[s].pages) for s in seq_ids), default=1) or 1
        table = np.zeros((len(seq_ids), width), dtype=np.int32)
        for row, s in enumerate(seq_ids):
            pages = self._seqs[s].pages
            table[row, : len(pages)] = pages
        return table
