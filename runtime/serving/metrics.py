"""The serving loop's Prometheus metrics, in a registry of their own (``/metrics`` renders it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "mlc_magicdec"
# step seconds: from a fast GPU decode step to a long CPU prefill chunk
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PHASES = ("prefill", "decode", "draft", "verify", "views")  # views: building draft views
BATCH_BUCKETS = tuple(2**i for i in range(11))  # running sequences in a decode round


class ServeMetrics:
    """Counters, gauges and histograms of one serving loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def metric(kind, name: str, doc: str, **kw):
            return kind(f"{PREFIX}_{name}", doc, registry=self.registry, **kw)

        self.running = metric(Gauge, "requests_running", "Requests admitted (prefilling or decoding).")
        self.waiting = metric(Gauge, "requests_waiting", "Requests queued for admission.")
        self.requests = metric(
            Counter, "requests", "Finished requests, by finish reason.", labelnames=["reason"]
        )
        self.prompt_tokens = metric(
            Counter, "prompt_tokens", "Prompt tokens prefilled (recomputation included)."
        )
        self.generated_tokens = metric(Counter, "generation_tokens", "Tokens generated.")
        self.plain_steps = metric(Counter, "plain_steps", "Plain decode steps of the running batch.")
        self.spec_rounds = metric(Counter, "speculative_rounds", "Speculative rounds of the running batch.")
        self.decode_batch = metric(
            Histogram, "decode_batch", "Sequences in each decode step or round.", buckets=BATCH_BUCKETS
        )
        self.drafted = metric(Counter, "draft_tokens", "Tokens drafted.")
        self.accepted = metric(Counter, "accepted_tokens", "Drafted tokens the target accepted.")
        self.acceptance_rate = metric(Gauge, "acceptance_rate", "Accepted / drafted tokens so far.")
        self.accepted_length = metric(
            Gauge, "accepted_length", "Mean tokens gained per sequence and speculative round so far."
        )
        self.step_seconds = metric(
            Histogram,
            "step_seconds",
            "Seconds of each phase of a step.",
            labelnames=["phase"],
            buckets=STEP_BUCKETS,
        )
        for phase in PHASES:
            self.step_seconds.labels(phase)  # every phase is exported from the start
        self.kv_pages_used = metric(Gauge, "kv_pages_used", "KV pages held by admitted requests.")
        self.kv_pages_free = metric(Gauge, "kv_pages_free", "Free KV pages.")
        self.preemptions = metric(
            Counter, "preemptions", "Requests preempted for KV pages (recomputed later)."
        )
        self._totals = {"drafted": 0, "accepted": 0, "gained": 0, "sequences": 0}

    def observe_round(self, drafted: int, accepted: int, gained: int, sequences: int) -> None:
        """A speculative round: ``drafted``/``accepted`` tokens, ``gained`` tokens over ``sequences``."""
        self.spec_rounds.inc()
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        t = self._totals
        for key, value in (
            ("drafted", drafted),
            ("accepted", accepted),
            ("gained", gained),
            ("sequences", sequences),
        ):
            t[key] += value
        self.acceptance_rate.set(t["accepted"] / t["drafted"] if t["drafted"] else 0.0)
        self.accepted_length.set(t["gained"] / t["sequences"] if t["sequences"] else 0.0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
