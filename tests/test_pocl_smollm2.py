"""SmolLM2 on ``--target pocl`` (the CUDA library's kernels run on the CPU by PoCL) against the llvm artifact.

PoCL runs a SmolLM2 decode step in about two seconds, so the prompt is short (``PROMPT_TOKENS``) and the batch
is prefilled once: the prompt's logits, 16 greedy tokens, then speculative greedy decoding with both views
at gamma 1-4, each equal to plain greedy decoding.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import TARGET_ENV

from mlc_magicdec.compile.build import compile_model
from mlc_magicdec.constants import DRAFT_KINDS
from mlc_magicdec.runtime import opencl
from mlc_magicdec.runtime.engine import Engine

POCL_MISSING = opencl.available()
pytestmark = [
    pytest.mark.skipif(POCL_MISSING is not None, reason=f"PoCL cannot run here: {POCL_MISSING}"),
    pytest.mark.skipif(TARGET_ENV in os.environ, reason=f"the llvm reference is replaced by ${TARGET_ENV}"),
]
PROMPT_TOKENS = 128
GREEDY_TOKENS = 16
SPECULATIVE_TOKENS = 8  # per (view, gamma): each round costs gamma draft steps and a verify on PoCL
GAMMAS = (1, 2, 3, 4)
BUDGET = 64  # KV entries of the draft's view: half the prompt, so the draft differs from the target
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def engines(smollm2_gguf, smollm2_artifact, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2-pocl") / "artifact"
    pocl = compile_model(smollm2_gguf, folder, target="pocl", quiet=True)
    return Engine(pocl), Engine(smollm2_artifact)


@pytest.fixture(scope="module")
def prompt(engines, austen_texts) -> list[int]:
    text = austen_texts["persuasion"]
    start = len(text) // 3
    return engines[0].encode(text[start : start + 8 * PROMPT_TOKENS])[:PROMPT_TOKENS]


@pytest.fixture(scope="module")
def prefilled(engines, prompt):
    pocl, llvm = engines
    with pocl.prefill([prompt], max_new_tokens=GREEDY_TOKENS, max_gamma=max(GAMMAS)) as batch:
        yield batch


@pytest.fixture(scope="module")
def plain(engines, prompt) -> list[int]:
    return engines[1].generate([prompt], max_new_tokens=GREEDY_TOKENS, stop_at_eos=False)[0].token_ids


def test_prompt_logits_match_the_llvm_artifact(engines, prompt, prefilled):
    with engines[1].prefill([prompt], max_new_tokens=1) as reference:
        np.testing.assert_allclose(prefilled.logits, reference.logits, atol=LOGITS_ATOL, rtol=0)


def test_greedy_tokens_match_the_llvm_artifact(engines, prefilled, plain):
    (result,) = engines[0].decode(prefilled, stop_at_eos=False)
    assert result.token_ids == plain


@pytest.mark.parametrize("draft", DRAFT_KINDS)
def test_speculative_greedy_equals_plain_greedy(engines, prefilled, plain, draft):
    for gamma in GAMMAS:
        (result,) = engines[0].decode(
            prefilled, max_new_tokens=SPECULATIVE_TOKENS, stop_at_eos=False, speculate=True, draft=draft,
            budget=BUDGET, gamma=gamma,
        )
        assert result.token_ids == plain[:SPECULATIVE_TOKENS], f"gamma {gamma}"
        assert result.accepted_lengths, f"gamma {gamma}: no speculative round ran"
