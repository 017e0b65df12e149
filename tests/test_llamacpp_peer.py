"""The llama.cpp peers (needs the optional ``peers`` extra): our batched C-API decoder against
``llama_cpp.Llama``'s own greedy generation, and prompt lookup against plain greedy decoding."""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from mlc_magicdec.bench import llamacpp  # noqa: E402

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
STEPS = 12


@pytest.fixture(scope="module", params=["f16", "f32"])
def kv_dtype(request):
    """The KV cache's element type: llama.cpp's default, and the one matching our fp32 artifact."""
    return request.param


@pytest.fixture(scope="module")
def prompt_ids(smollm2_gguf, kv_dtype):
    kv = llamacpp._ggml_type(kv_dtype)
    llm = llama_cpp.Llama(str(smollm2_gguf), n_ctx=256, n_threads=1, type_k=kv, type_v=kv, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    reference = []
    for tok in llm.generate(ids, temp=0.0, top_k=1):
        reference.append(tok)
        if len(reference) == STEPS:
            break
    llm.close()
    return ids, reference


def test_plain_decoder_matches_llama_greedy_at_every_batch_row(smollm2_gguf, prompt_ids, kv_dtype):
    ids, reference = prompt_ids
    dec = llamacpp.PlainDecoder(smollm2_gguf, 3, len(ids) + STEPS, 1, flash_attn=False, kv_dtype=kv_dtype)
    try:
        _, first = dec.prefill(ids)
        _, out = dec.decode(first, STEPS - 1)
        _, again = dec.decode(first, STEPS - 1)  # a second decode restarts from the same prefill
    finally:
        dec.close()
    assert [[first] + row for row in out] == [reference] * 3
    assert again == out


def test_prompt_lookup_is_lossless(smollm2_gguf, prompt_ids, kv_dtype):
    ids, reference = prompt_ids
    dec = llamacpp.PromptLookupDecoder(
        smollm2_gguf, len(ids) + STEPS + 1, 1, flash_attn=False, kv_dtype=kv_dtype
    )
    try:
        dec.prefill(ids)
        _, out = dec.decode(ids, STEPS)
    finally:
        dec.close()
    assert out == reference
