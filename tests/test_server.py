"""The OpenAI-compatible server, driven over HTTP on 127.0.0.1 by the official ``openai`` client (streaming
included) and by raw requests for what a client library would refuse to send. The oracles: plain greedy
decoding of the same prompt, and transformers' own rendering of the chat template."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from openai import OpenAI

from mlc_magicdec import tvm_loading
from mlc_magicdec.compile.build import compile_model
from mlc_magicdec.interface.serve import BackgroundServer
from mlc_magicdec.manifest import CONFIG_NAME
from mlc_magicdec.runtime.engine import Engine
from mlc_magicdec.runtime.serving import ServeConfig
from mlc_magicdec.runtime.serving.async_engine import AsyncEngine
from mlc_magicdec.tvm_loading import COMPILER_LIBRARY, RUNTIME_ONLY_ENV

# a ChatML-style template that uses the special tokens and a loop variable, as real ones do
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<sys>be brief</sys>\n"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


class Server(BackgroundServer):
    """The real server in a thread, with the official client and raw requests."""

    def __init__(self, engine: AsyncEngine):
        super().__init__(engine, "tiny")
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def post(self, path: str, body: str) -> httpx.Response:
        return httpx.post(self.url + path, content=body, headers={"content-type": "application/json"})

    def metric(self, name: str, labels: dict | None = None) -> float | None:
        return self.engine.metrics.registry.get_sample_value(name, labels or {})


@pytest.fixture(scope="module")
def chat_artifact(tiny_models, tmp_path_factory):
    folder, _, _ = tiny_models("llama")
    root = tmp_path_factory.mktemp("chat")
    shutil.copytree(folder, root / "hf")
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return compile_model(root / "hf", root / "artifact", target="llvm", quiet=True)


@pytest.fixture(scope="module")
def server(chat_artifact):
    s = Server(AsyncEngine(chat_artifact, ServeConfig(speculate="on", draft_budget=40, max_waiting=8)))
    yield s
    s.close()


@pytest.fixture(scope="module")
def plain(chat_artifact):
    engine = Engine(chat_artifact)
    return lambda prompt, n: engine.generate(prompt, max_new_tokens=n, stop_at_eos=False)[0]


GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_completion_equals_plain_greedy_decoding(server, plain):
    r = server.client.completions.create(model="tiny", prompt="abc def ghi", max_tokens=24, **GREEDY)
    want = plain("abc def ghi", 24)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 24)
    assert r.object == "text_completion" and r.model == "tiny"


def test_streamed_completion_equals_the_whole_one_and_reports_usage(server, plain):
    chunks = list(
        server.client.completions.create(
            model="tiny",
            prompt="klm nop",
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain("klm nop", 20).text
    assert len([c for c in chunks if c.choices]) > 2  # it really streamed
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_renders_the_models_template_as_transformers_does(server, plain, chat_artifact):
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "user", "content": "hello there"}]
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(chat_artifact / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )
    prompt = hf.apply_chat_template(
        messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<s><sys>be brief</sys>\n<user>hello there</user>\n<assistant>")
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, **GREEDY)
    ids = hf(prompt, add_special_tokens=False)["input_ids"]
    assert r.choices[0].message.content == plain(ids, 16).text
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)
    stream = server.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == plain(ids, 16).text


def test_concurrent_clients_each_get_their_own_plain_output(server, plain):
    prompts = ["abc", "defgh ij" * 5, "k", "lmnop " * 12]
    results = [None] * len(prompts)

    def ask(i):
        results[i] = server.client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=12 + i, **GREEDY
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        assert results[i].choices[0].text == plain(p, 12 + i).text


@pytest.mark.parametrize(
    "body,words",
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": 5}', "prompt"),
        ('{"prompt": "abc", "max_tokens": "9"}', "max_tokens"),
        ('{"prompt": "abc", "temperature": -0.5}', "temperature"),
        ('{"prompt": "abc", "n": 2}', "n"),
        ('{"prompt": "abc", "speculate": "sometimes"}', "speculate"),
        ('{"prompt": "' + "a" * 600 + '"}', "context window"),
        ('{"prompt": [1, 100000]}', "vocabulary"),
        ("[1, 2]", "body"),
    ],
)
def test_bad_requests_get_a_400_with_an_openai_error_body(server, body, words):
    r = server.post("/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    assert server.client.models.list().data[0].id == "tiny"  # the server is unaffected


def test_a_bad_chat_request_gets_a_400(server):
    r = server.post("/v1/chat/completions", '{"messages": []}')
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", '{"messages": [{"content": "no role"}]}')
    assert r.status_code == 400


def test_a_client_that_disconnects_mid_stream_aborts_its_request(server):
    before = server.metric("mlc_magicdec_requests_total", {"reason": "abort"}) or 0.0
    body = {"prompt": "abc", "max_tokens": 400, "stream": True, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    deadline = time.time() + 30
    while (
        time.time() < deadline
        and (server.metric("mlc_magicdec_requests_total", {"reason": "abort"}) or 0) == before
    ):
        time.sleep(0.05)
    assert server.metric("mlc_magicdec_requests_total", {"reason": "abort"}) == before + 1
    while time.time() < deadline and server.metric("mlc_magicdec_kv_pages_used") != 0:
        time.sleep(0.05)
    assert server.metric("mlc_magicdec_kv_pages_used") == 0
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_metrics_report_the_loop(server):
    server.client.completions.create(model="tiny", prompt="abcabc", max_tokens=10, **GREEDY)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "requests_running",
        "requests_waiting",
        "prompt_tokens_total",
        "generation_tokens_total",
        "speculative_rounds_total",
        "draft_tokens_total",
        "accepted_tokens_total",
        "acceptance_rate",
        "accepted_length",
        "step_seconds_bucket",
        "kv_pages_used",
        "kv_pages_free",
        "preemptions_total",
        "decode_batch_bucket",
    ):
        assert f"mlc_magicdec_{name}" in text, name
    assert server.metric("mlc_magicdec_speculative_rounds_total") > 0
    rounds = server.metric("mlc_magicdec_speculative_rounds_total") + server.metric(
        "mlc_magicdec_plain_steps_total"
    )
    assert server.metric("mlc_magicdec_decode_batch_count") == rounds
    assert server.metric("mlc_magicdec_step_seconds_count", {"phase": "verify"}) > 0


def test_async_engine_streams_concurrent_requests_and_aborts_one_left_early(server, plain):
    """The loop embedded without HTTP: ``async for`` over ``generate`` with keyword settings; concurrent
    requests each equal plain greedy decoding; leaving an iterator early aborts its request and frees its
    pages; an unknown setting is refused in one line."""
    import asyncio

    from mlc_magicdec import AsyncEngine as TopLevel
    from mlc_magicdec.runtime.speculation import RequestError

    engine = server.engine
    assert TopLevel is AsyncEngine

    async def collect(prompt: str) -> tuple[str, str]:
        text, reason = "", None
        async for out in engine.generate(prompt, max_tokens=20, ignore_eos=True, speculate="on"):
            text += out.text
            reason = out.finish_reason
        return text, reason

    async def leave_early() -> int:
        got = 0
        async for out in engine.generate("zzz yyy", max_tokens=200, ignore_eos=True):
            got += len(out.token_ids)
            if got >= 3:
                break
        return got

    async def main():
        return await asyncio.gather(collect("abc abc"), collect("hello there"), leave_early())

    aborted = server.metric("mlc_magicdec_requests_total", {"reason": "abort"}) or 0.0
    a, b, early = asyncio.run(main())
    assert a == (plain("abc abc", 20).text, "length") and b == (plain("hello there", 20).text, "length")
    assert early >= 3
    deadline = time.time() + 10
    while time.time() < deadline and server.metric("mlc_magicdec_kv_pages_used") != 0:
        time.sleep(0.05)
    assert server.metric("mlc_magicdec_kv_pages_used") == 0
    assert server.metric("mlc_magicdec_requests_total", {"reason": "abort"}) == aborted + 1
    with pytest.raises(RequestError, match="unknown generation setting 'max_new_tokens'"):
        asyncio.run(collect_bad(engine))


async def collect_bad(engine: AsyncEngine) -> None:
    async for _ in engine.generate("abc", max_new_tokens=5):
        pass


def test_a_full_queue_gets_a_429(chat_artifact):
    engine = AsyncEngine(chat_artifact, ServeConfig(speculate="off", max_waiting=1))
    gate = threading.Event()
    step = engine.serving.step
    engine.serving.step = lambda: (gate.wait(), step())  # the loop holds still until the gate opens
    s = Server(engine)
    try:
        first = threading.Thread(
            target=s.post, args=("/v1/completions", '{"prompt": "abc", "max_tokens": 2}')
        )
        first.start()
        deadline = time.time() + 10
        while engine.serving._queued == 0 and time.time() < deadline:
            time.sleep(0.02)
        r = s.post("/v1/completions", '{"prompt": "abc", "max_tokens": 2}')
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        first.join()
        assert s.post("/v1/completions", '{"prompt": "abc", "max_tokens": 2}').status_code == 200
    finally:
        gate.set()
        s.close()


def test_smollm2_chat_over_http_equals_plain_decoding_of_its_gguf_template(smollm2_artifact, smollm2_gguf):
    """The real model: its GGUF chat template rendered as transformers renders it, and concurrent chats
    (speculating automatically) each equal to plain greedy decoding of their rendered prompt."""
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

    field = GGUFReader(str(smollm2_gguf)).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_artifact / "tokenizer.json"))
    chats = [
        [{"role": "user", "content": "Who wrote Emma?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    ]
    s = Server(AsyncEngine(smollm2_artifact, ServeConfig(speculate="auto", max_running=4)))
    try:
        replies = [None] * len(chats)

        def ask(i):
            replies[i] = s.client.chat.completions.create(
                model="tiny", messages=chats[i], max_tokens=16, **GREEDY
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(chats))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        engine = Engine(smollm2_artifact)
        for chat, reply in zip(chats, replies):
            prompt = hf.apply_chat_template(
                chat, chat_template=template, tokenize=False, add_generation_prompt=True
            )
            ids = hf(prompt, add_special_tokens=False)["input_ids"]
            [want] = engine.generate(ids, max_new_tokens=16, stop_at_eos=False)
            assert reply.choices[0].message.content == want.text
            assert reply.usage.prompt_tokens == len(ids)
    finally:
        s.close()


def test_the_load_benchmark_soaks_the_server_without_losing_a_request(chat_artifact, tmp_path):
    """``bench serve`` end to end on a tiny model: every mode on one schedule, clients that hang up, malformed
    requests and a pool small enough to preempt; no well-formed request is lost and every completed one
    equals its plain single run."""
    from mlc_magicdec.bench.serve_load import LoadConfig
    from mlc_magicdec.interface.bench_serve import serve_load_bench

    load = LoadConfig(
        context=(20, 120),
        rates=(float("inf"), 50.0),
        requests=24,
        output_tokens=12,
        modes=("off", "on"),
        seed=3,
        disconnect=0.15,
        malformed=0.15,
    )
    serving = ServeConfig(max_running=8, max_batch_tokens=200, kv_capacity=16 * 24, draft_budget=40)
    out = serve_load_bench(
        chat_artifact,
        load,
        serving,
        check=True,
        json_path=tmp_path / "load.json",
        plot_path=tmp_path / "load.png",
    )
    kinds = [r["kind"] for r in out["runs"][0]["records"]]
    assert kinds.count("malformed") and kinds.count("disconnect")
    for run in out["runs"]:
        assert run["lost"] == 0 and not run["errors"], run["errors"]
        assert run["malformed_rejected"] == kinds.count("malformed")
        assert run["completed"] == kinds.count("ok")
    assert out["plain_check"]["checked"] == 4 * kinds.count("ok") and not out["plain_check"]["mismatches"]
    assert out["preemptions_total"] > 0 and out["health_after"] == 200
    assert json.loads((tmp_path / "load.json").read_text())["runs"][1]["mode"] == "on"
    assert (tmp_path / "load.png").stat().st_size > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command_runs_on_tvms_runtime_alone(chat_artifact, plain):
    """``mlc-magicdec serve`` in its own process loads TVM's runtime library without the compiler
    (``tvm_loading.runtime_only``: about 110 MB less resident) and answers as plain greedy decoding does."""
    port = _free_port()
    command = [sys.executable, "-m", "mlc_magicdec.cli", "serve", str(chat_artifact), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != RUNTIME_ONLY_ENV}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            time.sleep(0.5)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="tiny", prompt="abc def ghi", max_tokens=12, **GREEDY)
        assert r.choices[0].text == plain("abc def ghi", 12).text
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "libtvm_runtime.so" in maps and COMPILER_LIBRARY not in maps
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_runtime_alone_is_for_cpu_artifacts(chat_artifact, tmp_path, monkeypatch):
    """TVM's runtime-only mode loads no device backend, so ``runtime_only`` takes it only when every
    artifact runs on the CPU; a GPU artifact (here the same one, its config moved to cuda:0) or a folder that
    is no artifact keeps the whole of TVM."""
    gpu = tmp_path / "gpu"
    shutil.copytree(chat_artifact, gpu)
    config = json.loads((gpu / CONFIG_NAME).read_text())
    config["target"]["device"] = "cuda:0"
    (gpu / CONFIG_NAME).write_text(json.dumps(config))
    assert tvm_loading.runs_on_cpu(chat_artifact)
    assert not tvm_loading.runs_on_cpu(gpu) and not tvm_loading.runs_on_cpu(tmp_path)
    monkeypatch.delitem(sys.modules, "tvm")  # as in a fresh process (restored after the test)
    for artifacts, runtime_alone in (([chat_artifact], True), ([chat_artifact, gpu], False)):
        monkeypatch.delenv(RUNTIME_ONLY_ENV, raising=False)
        tvm_loading.runtime_only(artifacts)
        assert (os.environ.get(RUNTIME_ONLY_ENV) == "1") == runtime_alone
