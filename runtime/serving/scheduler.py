"""Who runs: the waiting queue, the admitted requests, and their KV pages under pressure.

Requests are admitted first come, first served while fewer than ``max_running`` are admitted and the pool
has pages for the admitted one's whole prefix. Pages are then taken as sequences grow. When the pool runs
out, the most recently admitted request is preempted: its pages are freed and it goes back to the front of
the queue, to be recomputed from its tokens so far.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

from ..kv import KVPoolExhausted, PagePool
from .request import ServeRequest


class Scheduler:
    """The queue and the admitted requests (``prefilling`` then ``running``, each in admission order)."""

    def __init__(
        self, pools: Sequence[PagePool], max_running: int, on_preempt: Callable[[ServeRequest], None]
    ):
        self.pools = list(pools)  # the target's, and a separate draft model's: the same pages in each
        self.max_running = max_running
        self.on_preempt = on_preempt
        self.waiting: collections.deque[ServeRequest] = collections.deque()
        self.prefilling: list[ServeRequest] = []
        self.running: list[ServeRequest] = []
        self._admitted: list[ServeRequest] = []  # in admission order, newest last

    @property
    def free_pages(self) -> int:
        return min(p.free_pages for p in self.pools)

    @property
    def num_pages(self) -> int:
        return self.pools[0].num_pages

    def pages_for(self, tokens: int) -> int:
        return self.pools[0].pages_for(tokens)

    def admit(self) -> list[ServeRequest]:
        """Move waiting requests into ``prefilling`` while there is room; returns those admitted."""
        admitted = []
        while self.waiting and len(self._admitted) < self.max_running:
            r = self.waiting[0]
            if self.pages_for(len(r.prefix) + 1) > self.free_pages:
                break
            self.waiting.popleft()
            for pool in self.pools:
                pool.add(r.seq.seq_id)
                pool.reserve(r.seq.seq_id, len(r.prefix) + 1)
            self.prefilling.append(r)
            self._admitted.append(r)
            admitted.append(r)
        return admitted

    def promote(self, r: ServeRequest) -> None:
        """``r`` finished its prefill: it decodes from the next round on."""
        self.prefilling.remove(r)
        self.running.append(r)

    def grow(self, r: ServeRequest, tokens: int) -> bool:
        """Give ``r`` pages for ``tokens`` positions, preempting the newest admitted requests as needed;
        False if ``r`` itself had to be preempted."""
        while True:
            try:
                for pool in self.pools:
                    pool.reserve(r.seq.seq_id, tokens)
                return True
            except KVPoolExhausted:
                victim = self._admitted[-1]
                self.preempt(victim)
                if victim is r:
                    return False

    def preempt(self, r: ServeRequest) -> None:
        """Free ``r``'s pages and queue it again, first, to be recomputed from its tokens."""
        self._drop(r)
        r.prefilled = 0
        r.preemptions += 1
        self.waiting.appendleft(r)
        self.on_preempt(r)

    def release(self, r: ServeRequest) -> None:
        """``r`` is done (finished, aborted or failed): free its pages and forget it."""
        if r in self.waiting:
            self.waiting.remove(r)
        else:
            self._drop(r)

    def _drop(self, r: ServeRequest) -> None:
        for pool in self.pools:
            if r.seq.seq_id in pool:
                pool.remove(r.seq.seq_id)
        for group in (self.prefilling, self.running, self._admitted):
            if r in group:
                group.remove(r)

    def find(self, request_id: str) -> ServeRequest | None:
        for group in (self.waiting, self.prefilling, self.running):
            for r in group:
                if r.request_id == request_id:
                    return r
        return None

    @property
    def used_pages(self) -> int:
        return self.num_pages - self.free_pages
