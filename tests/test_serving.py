"""The serving loop on tiny random models: requests joining and leaving a live batch, KV pressure and
preemption, per-request settings, stop strings, aborts and refusals. The oracle for greedy output is each
request run alone with plain decoding (``Engine.generate``)."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_char_tokenizer

from mlc_magicdec.runtime.engine import Engine
from mlc_magicdec.runtime.serving import GenerationConfig, QueueFull, ServeConfig, ServingEngine
from mlc_magicdec.runtime.serving.textstream import TextStream
from mlc_magicdec.runtime.speculation import RequestError

ALPHABET = "abcdefghij klmnop"


class Collector:
    """A sink per request: everything the loop sent."""

    def __init__(self):
        self.outputs: dict[str, list] = {}

    def sink(self, out):
        self.outputs.setdefault(out.request_id, []).append(out)

    def tokens(self, rid):
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def text(self, rid):
        return "".join(o.text for o in self.outputs[rid])

    def finish(self, rid):
        return self.outputs[rid][-1].finish_reason


def preemptions(serving) -> float:
    return serving.metrics.registry.get_sample_value("mlc_magicdec_preemptions_total")


def random_prompts(rng, n, lo, hi):
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def serve_schedule(serving, prompts, configs, rng, arrive_p=0.4):
    """Submit the requests at random steps (each step, the next one arrives with probability ``arrive_p``)
    and step until all are done; returns (collector, request ids)."""
    col, ids, pending = Collector(), [], list(zip(prompts, configs))
    while pending or serving.has_work:
        while pending and rng.random() < arrive_p:
            prompt, config = pending.pop(0)
            ids.append(serving.submit(prompt, config, col.sink))
        serving.step()
    return col, ids


@pytest.mark.parametrize("family,draft", [("llama", "snapkv"), ("qwen2", "streamingllm")])
def test_live_batch_greedy_output_equals_each_request_alone(tiny_models, family, draft):
    """Random arrivals, mixed prompt and output lengths, every speculate mode and gamma in one batch, and a
    pool small enough that requests are preempted and recomputed: every greedy output (tokens and text)
    equals that request decoded alone, plainly."""
    _, _, artifact = tiny_models(family)
    rng = random.Random(f"{family}-{draft}")
    prompts = random_prompts(rng, 14, 5, 160)
    configs = [
        GenerationConfig(
            max_tokens=rng.randint(4, 40),
            ignore_eos=True,
            speculate=rng.choice(["auto", "on", "off"]),
            gamma=rng.choice([None, 1, 2, 5]),
            draft_budget=rng.choice([None, 40, 64]),
        )
        for _ in prompts
    ]
    engine = Engine(artifact)
    config = ServeConfig(
        speculate="on", draft=draft, draft_budget=48, max_running=6, max_batch_tokens=96, kv_capacity=16 * 16
    )
    serving = ServingEngine(engine, config)
    col, ids = serve_schedule(serving, prompts, configs, rng)
    assert preemptions(serving) > 0, "the pool should have been too small for every request at once"
    for rid, prompt, cfg in zip(ids, prompts, configs):
        [alone] = Engine(artifact).generate(prompt, max_new_tokens=cfg.max_tokens, stop_at_eos=False)
        assert col.tokens(rid) == alone.token_ids, (rid, cfg)
        assert col.text(rid) == alone.text
        assert col.finish(rid) == "length"
    assert serving.scheduler.used_pages == 0
    assert serving.stats.drafted_tokens > 0 and serving.stats.verify_steps > 0


def test_a_request_keeps_its_own_stop_string_and_limit(tiny_models):
    _, _, artifact = tiny_models("llama")
    engine = Engine(artifact)
    prompt = "abc def ghi jkl"
    [alone] = engine.generate(prompt, max_new_tokens=30, stop_at_eos=False)
    stop = alone.text[12:14]
    cut = alone.text.index(stop)
    serving = ServingEngine(Engine(artifact), ServeConfig(speculate="on", draft_budget=40))
    col = Collector()
    a = serving.submit(prompt, GenerationConfig(max_tokens=30, ignore_eos=True, stop=(stop,)), col.sink)
    b = serving.submit(prompt, GenerationConfig(max_tokens=7, ignore_eos=True), col.sink)
    serving.run_until_idle()
    assert col.text(a) == alone.text[:cut] and col.finish(a) == "stop"
    assert col.text(b) == engine.decode_text(alone.token_ids[:7]) and col.finish(b) == "length"
    assert col.outputs[b][-1].usage.completion_tokens == 7


def test_abort_frees_the_pages_at_once(tiny_models):
    _, _, artifact = tiny_models("llama")
    serving = ServingEngine(Engine(artifact), ServeConfig(speculate="off", max_running=4))
    col = Collector()
    rids = [
        serving.submit("abcdefgh" * 10, GenerationConfig(max_tokens=200, ignore_eos=True), col.sink)
        for _ in range(3)
    ]
    for _ in range(3):
        serving.step()
    assert serving.scheduler.used_pages > 0
    for rid in rids:
        serving.abort(rid)
    serving.step()
    assert serving.scheduler.used_pages == 0 and not serving.has_work
    assert all(col.finish(rid) == "abort" for rid in rids)
    registry = serving.metrics.registry
    assert registry.get_sample_value("mlc_magicdec_requests_total", {"reason": "abort"}) == 3


def test_requests_that_can_never_be_served_are_refused_at_once(tiny_models):
    _, _, artifact = tiny_models("llama")
    engine = Engine(artifact)
    ctx = engine.config.context_window
    serving = ServingEngine(engine, ServeConfig(kv_capacity=16 * 8, max_waiting=2))
    sink = Collector().sink
    cases = [
        ("a" * (ctx - 4), GenerationConfig(max_tokens=8), "context window"),
        ("a" * 100, GenerationConfig(max_tokens=100), "whole pool"),
        ([1, 999], GenerationConfig(max_tokens=4), "outside the vocabulary"),
        ("", GenerationConfig(max_tokens=4), "empty"),
        ("abc", GenerationConfig(max_tokens=4, temperature=-1.0), "temperature"),
        ("abc", GenerationConfig(max_tokens=4, top_p=0.0), "top_p"),
        ("abc", GenerationConfig(max_tokens=0), "max_tokens"),
        ("abc", GenerationConfig(max_tokens=4, speculate="sometimes"), "speculate"),
        ("abc", GenerationConfig(max_tokens=4, gamma=0), "gamma"),
        ("abc", GenerationConfig(max_tokens=4, draft_budget=ctx), "draft_budget"),
    ]
    for prompt, config, words in cases:
        with pytest.raises(RequestError, match=words) as e:
            serving.submit(prompt, config, sink)
        assert "\n" not in str(e.value)
    small = GenerationConfig(max_tokens=4)
    serving.submit("abc", small, sink)
    serving.submit("abc", small, sink)
    with pytest.raises(QueueFull, match="queue is full"):
        serving.submit("abc", small, sink)
    serving.run_until_idle()
    serving.submit("abc", small, sink)  # room again once they were admitted


def test_bad_serve_settings_are_refused():
    with pytest.raises(RequestError, match="max_batch_tokens"):
        ServeConfig(max_running=64, max_batch_tokens=64).validate()
    with pytest.raises(RequestError, match="speculate"):
        ServeConfig(speculate="maybe").validate()


# ------------------------------------------------------------------------------------------------------
# The text stream


def stream_of(stop=()):
    return TextStream(tiny_char_tokenizer(), stop)


def ids(text):
    return tiny_char_tokenizer().encode(text, add_special_tokens=False).ids


def test_the_text_stream_holds_back_what_a_stop_string_could_still_remove():
    s = stream_of(["xyz"])
    s.push(ids("hello x"))
    assert s.delta() == "hello"  # "xyz" is 3 characters: the last 2 could still start it
    s.push(ids("y"))
    assert s.delta() == " "
    s.push(ids("zzz tail"))
    assert s.stopped and s.text == "hello " and s.delta(final=True) == ""


def test_the_text_stream_without_stop_strings_streams_everything():
    s = stream_of()
    pieces = []
    for ch in "streamed text":
        s.push(ids(ch))
        pieces.append(s.delta())
    assert "".join(pieces) == "streamed text" and pieces[0] == "s"


def test_a_stop_string_in_the_final_flush_still_stops_the_text():
    """A round's tokens that end inside a UTF-8 character are held back whole; if the request ends there,
    the final flush still cuts at a stop string among them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    s = TextStream(tok, ["STOP"])
    s.push(tok.encode("ok then ").ids)
    streamed = s.delta()
    s.push(tok.encode("no STOP é").ids[:-1])  # ends with the first byte of "é"
    assert s.delta() == ""
    assert streamed + s.delta(final=True) == "ok then no " and s.stopped


def test_a_pool_the_kernels_cannot_index_is_refused_in_one_line(tiny_models):
    from mlc_magicdec.runtime.kv import KVPoolExhausted
    from mlc_magicdec.runtime.runner import ModelRunner

    _, _, artifact = tiny_models("llama")
    runner = ModelRunner(Engine(artifact).artifact)
    with pytest.raises(KVPoolExhausted, match="32-bit offsets"):
        runner.ensure_pool(runner.max_pages + 1)
