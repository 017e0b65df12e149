"""``AsyncEngine``: the serving loop in its own thread, its results delivered to asyncio.

engine = AsyncEngine("artifact-dir")
async for out in engine.generate("Once upon a time", max_tokens=64, temperature=0.7):
    print(out.text, end="")
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from ..engine import Engine
from ..speculation import RequestError
from .loop import ServeConfig, ServingEngine
from .metrics import ServeMetrics
from .request import GenerationConfig, RequestOutput

log = logging.getLogger("mlc_magicdec.serve")
IDLE_WAIT_S = 0.5  # the loop thread sleeps this long at most when there is nothing to do


class RequestStream:
    """One request's outputs, as an async iterator; leaving it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine, self.request_id, self._queue = engine, request_id, queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.finished = out.finished
        return out

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)
            self.finished = True


class AsyncEngine:
    """A continuous-batching engine for asyncio apps: ``submit``/``generate`` and ``abort``.

    It loads the artifact (and ``draft_model``) like ``Engine`` and runs ``ServingEngine`` steps in a
    daemon thread until ``close``.
    """

    def __init__(
        self,
        artifact: str | Path | None = None,
        config: ServeConfig | None = None,
        *,
        threads: int | None = None,
        draft_model: str | Path | None = None,
        engine: Engine | None = None,
    ):
        self.engine = engine or Engine(artifact, threads=threads, draft_model=draft_model)
        self.metrics = ServeMetrics()
        self.serving = ServingEngine(self.engine, config or ServeConfig(), self.metrics)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlc-magicdec-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                if self.serving.has_work:
                    self.serving.step()
                else:
                    self.serving.wake.wait(IDLE_WAIT_S)
            except Exception:  # noqa: BLE001 - keep serving; step() already failed the requests it could
                log.exception("serving loop error")

    def submit(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        request_id: str | None = None,
        **fields,
    ) -> RequestStream:
        """Queue a request (``RequestError``/``QueueFull`` at once if it cannot be) and return its stream.
        Settings come as ``config`` or as ``GenerationConfig`` fields (``max_tokens=64, stop=["\\n"]``).
        Call from a running event loop."""
        config = _config(config, fields)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(out: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the event loop is gone: nobody is listening
                pass

        request_id = self.serving.submit(prompt, config, sink, request_id)
        return RequestStream(self, request_id, queue)

    async def generate(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        request_id: str | None = None,
        **fields,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (settings as in ``submit``); closing the iterator early aborts it."""
        stream = self.submit(prompt, config, request_id, **fields)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self.serving.abort(request_id)

    def close(self) -> None:
        """Stop the loop thread (requests still in flight get no more output)."""
        self._closed.set()
        self.serving.wake.set()
        self._thread.join()

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _config(config: GenerationConfig | None, fields: dict) -> GenerationConfig:
    """``config`` with ``fields`` replaced (a list of stop strings becomes a tuple)."""
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        choices = ", ".join(sorted(names))
        raise RequestError(f"unknown generation setting {unknown[0]!r}; use one of {choices}")
    if isinstance(fields.get("stop"), (list, str)):
        stop = fields["stop"]
        fields["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return dataclasses.replace(config or GenerationConfig(), **fields)
