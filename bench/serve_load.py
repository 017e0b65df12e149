"""The load benchmark of the server: Poisson arrivals (or a fixed concurrency) of Austen prompts, every
``speculate`` mode on the same seeded schedule, over HTTP like any client.

Per mode and rate it reports request throughput, output tokens/s, TTFT and TPOT percentiles, TTFT's split
into queueing and prefill (the server's ``timing`` extension), acceptance, the step time spent in prefill
and in decoding (from ``/metrics``), preemptions and errors. A soak run adds clients that hang up mid-stream
and malformed requests; both must leave the well-formed requests unharmed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence

import httpx2 as httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ..runtime.serving.metrics import PHASES

MALFORMED_BODIES = (  # what a broken client sends: each must get a 400 and harm nobody else
    '{"prompt": [1, 2',
    '{"prompt": 5, "max_tokens": 4}',
    '{"prompt": "Emma", "temperature": -1}',
    '{"prompt": "Emma", "max_tokens": "many"}',
)
PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """What to send. ``rates`` in requests/s (``inf``: all at once), or a fixed ``concurrency`` instead."""

    context: tuple[int, int] = (2048, 8192)  # prompt tokens, uniform over this range
    rates: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)
    concurrency: int | None = None
    requests: int = 64
    output_tokens: int = 256
    modes: tuple[str, ...] = ("off", "auto")
    seed: int = 0
    disconnect: float = 0.0  # fraction of clients that hang up mid-stream
    malformed: float = 0.0  # fraction of requests that are malformed


@dataclasses.dataclass
class Planned:
    """One request of the schedule."""

    index: int
    prompt: list[int]
    arrival: float  # seconds after the start (Poisson schedules)
    kind: str = "ok"  # ok | disconnect | malformed
    hang_up_after: int = 0  # chunks a disconnecting client reads


@dataclasses.dataclass
class Record:
    """What the client saw of one request."""

    index: int
    kind: str
    status: int = 0
    sent: float = 0.0
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    text: str = ""
    finish: str | None = None
    timing: dict | None = None
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.kind == "ok" and self.error is None and self.finish is not None


def plan(prompt_source: Sequence[int], config: LoadConfig) -> list[Planned]:
    """The seeded schedule: prompts of random lengths and offsets, arrivals, and who misbehaves."""
    rng = np.random.default_rng(config.seed)
    lo, hi = config.context
    out = []
    for i in range(config.requests):
        length = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(prompt_source) - length))
        roll = rng.random()
        kind = (
            "malformed"
            if roll < config.malformed
            else "disconnect"
            if roll < config.malformed + config.disconnect
            else "ok"
        )
        out.append(
            Planned(i, list(prompt_source[start : start + length]), 0.0, kind, int(rng.integers(1, 8)))
        )
    return out


def with_arrivals(requests: list[Planned], rate: float, seed: int) -> list[Planned]:
    """Poisson arrivals at ``rate`` requests/s (all at 0 for an infinite rate), the same for every mode."""
    gaps = (
        np.zeros(len(requests))
        if math.isinf(rate)
        else np.random.default_rng(seed).exponential(1 / rate, len(requests))
    )
    times = np.cumsum(gaps) - gaps[0]
    return [dataclasses.replace(r, arrival=float(t)) for r, t in zip(requests, times)]


def scrape(url: str) -> dict[str, float]:
    """The server's metrics as ``name{labels}`` -> value."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def _send(
    client: httpx.AsyncClient, url: str, r: Planned, mode: str, config: LoadConfig, t0: float
) -> Record:
    rec = Record(r.index, r.kind, sent=time.perf_counter() - t0)
    if r.kind == "malformed":
        body = MALFORMED_BODIES[r.index % len(MALFORMED_BODIES)]
        resp = await client.post(
            url + "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        rec.status = resp.status_code
        rec.error = None if resp.status_code == 400 else f"expected 400, got {resp.status_code}"
        return rec
    body = {
        "prompt": r.prompt,
        "max_tokens": config.output_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "speculate": mode,
    }
    chunks = []
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter() - t0
                if "error" in chunk:
                    rec.error = chunk["error"]["message"]
                    break
                if chunk.get("usage"):
                    rec.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["text"] and rec.first is None:
                        rec.first = now
                    chunks.append(choice["text"])
                    rec.finish = choice["finish_reason"] or rec.finish
                    rec.timing = chunk.get("timing") or rec.timing
                    rec.end = now
                if r.kind == "disconnect" and len(chunks) >= r.hang_up_after:
                    break  # hang up: leaving the block closes the connection
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
    rec.text = "".join(chunks)
    return rec


async def _run_mode(
    url: str, requests: list[Planned], mode: str, config: LoadConfig, on_done: Callable
) -> list[Record]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        t0 = time.perf_counter()
        gate = asyncio.Semaphore(config.concurrency) if config.concurrency else None

        async def one(r: Planned) -> Record:
            if gate is None:
                await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - t0)))
                rec = await _send(client, url, r, mode, config, t0)
            else:
                async with gate:
                    rec = await _send(client, url, r, mode, config, t0)
            on_done()
            return rec

        return list(await asyncio.gather(*(one(r) for r in requests)))


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {f"p{p}": (float(np.percentile(arr, p)) if arr.size else None) for p in PERCENTILES}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(records: list[Record], before: dict, after: dict) -> dict:
    """The figures of one (mode, rate) run from its records and the metrics scraped around it."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    done = [r for r in records if r.completed]
    start = min((r.sent for r in records), default=0.0)
    makespan = max((r.end for r in done if r.end is not None), default=start) - start
    tpot = [(r.end - r.first) / (r.tokens - 1) for r in done if r.first is not None and r.tokens > 1]
    drafted = delta("mlc_magicdec_draft_tokens_total")
    phase = {p: delta(f"mlc_magicdec_step_seconds_sum{{phase={p}}}") for p in PHASES}
    well_formed = [r for r in records if r.kind != "malformed"]
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": [f"#{r.index}: {r.error}" for r in records if r.error],
        "lost": sum(1 for r in well_formed if r.kind == "ok" and not r.completed),
        "malformed_rejected": sum(1 for r in records if r.kind == "malformed" and r.status == 400),
        "makespan_s": makespan,
        "request_throughput": len(done) / makespan if makespan > 0 else None,
        "output_tokens_per_s": sum(r.tokens for r in done) / makespan if makespan > 0 else None,
        "ttft_s": _percentiles([r.first - r.sent for r in done if r.first is not None]),
        "tpot_s": _percentiles(tpot),
        "queue_s": _percentiles([(r.timing or {}).get("queue_s") for r in done]),
        "prefill_s": _percentiles([(r.timing or {}).get("prefill_s") for r in done]),
        "acceptance_rate": _ratio(delta("mlc_magicdec_accepted_tokens_total"), drafted),
        "speculative_rounds": delta("mlc_magicdec_speculative_rounds_total"),
        "plain_steps": delta("mlc_magicdec_plain_steps_total"),
        "mean_batch": _ratio(*(delta(f"mlc_magicdec_decode_batch_{s}") for s in ("sum", "count"))),
        "step_seconds": {"prefill": phase.pop("prefill"), "decoding": sum(phase.values())},
        "preemptions": delta("mlc_magicdec_preemptions_total"),
    }


def run(url: str, prompt_source: Sequence[int], config: LoadConfig, progress: Callable | None = None) -> dict:
    """Every mode at every rate (or the one concurrency) on the same schedule; returns the results and
    each run's records (for the greedy check)."""
    base = plan(prompt_source, config)
    rates = (None,) if config.concurrency else config.rates
    runs = []
    for rate in rates:
        requests = base if rate is None else with_arrivals(base, rate, config.seed + 1)
        for mode in config.modes:
            label = f"{mode}, " + (f"concurrency {config.concurrency}" if rate is None else f"{rate:g} req/s")
            tick = progress(label, len(requests)) if progress else (lambda: None)
            before = scrape(url)
            records = asyncio.run(_run_mode(url, requests, mode, config, tick))
            runs.append(
                {
                    "mode": mode,
                    "rate": rate,
                    "concurrency": config.concurrency,
                    **summarize(records, before, scrape(url)),
                    "records": [dataclasses.asdict(r) for r in records],
                }
            )
    health = httpx.get(url + "/health", timeout=30)
    return {
        "config": dataclasses.asdict(config),
        "runs": runs,
        "health_after": health.status_code,
        "preemptions_total": scrape(url).get("mlc_magicdec_preemptions_total", 0.0),
        "prompts": [r.prompt for r in base],
    }
