"""llama.cpp peers through ``llama-cpp-python`` (the ``peers`` extra): plain and prompt-lookup decoding.

- **Plain decoding** (any batch) uses llama.cpp's C API directly: one context with one KV stream per sequence
  (``n_seq_max = batch``), a ``llama_batch`` carrying one token of every sequence per step, greedy argmax on
  the logits. The prompt is prefilled once (timed); each timed decode then removes the generated positions
  from the KV cache (``llama_memory_seq_rm``) and decodes again from the same prefill. At batch > 1 the first
  prompt is prefilled and copied into every sequence's stream (``llama_memory_seq_cp``): a decode step costs
  the same whatever the KV values, and this keeps an 8 x 8k prefill from dominating the run.
- **Prompt-lookup speculative decoding** (batch 1) is ``llama_cpp.Llama`` with
  ``LlamaPromptLookupDecoding`` as its draft model, greedy; a repeated ``generate`` of the same prompt reuses
  the cached prefix, so only the first call pays for the prefill.

Both take ``flash_attn`` (llama.cpp's own default turns it on, which is slower on some CPUs) and ``kv_dtype``,
the KV cache's element type: llama.cpp keeps it in F16 by default, half the bytes of an F32 cache.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_BATCH_TOKENS = 512  # tokens per llama_decode call during prefill (llama.cpp's default n_batch)
CTX_ALIGN = 256  # llama.cpp pads context sizes to this
NO_MORE = -1  # "to the end" for llama_memory_seq_rm / seq_cp positions


def available() -> bool:
    """Whether ``llama_cpp`` (the ``peers`` extra) is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _lib():
    import llama_cpp

    return llama_cpp


_LOG_SINK = None  # keeps the ctypes callback alive


def _quiet() -> None:
    """Silence llama.cpp's logging (it prints model details for every context)."""
    global _LOG_SINK
    lib = _lib()
    if _LOG_SINK is None:
        _LOG_SINK = lib.llama_log_callback(lambda _level, _text, _data: None)
        lib.llama_log_set(_LOG_SINK, ctypes.c_void_p())


def _ggml_type(kv_dtype: str) -> int:
    lib = _lib()
    return {"f16": lib.GGML_TYPE_F16, "f32": lib.GGML_TYPE_F32}[kv_dtype]


def context_size(batch: int, tokens: int) -> int:
    """KV slots for ``batch`` streams of ``tokens`` each, rounded up to llama.cpp's granularity."""
    per_seq = -(-tokens // CTX_ALIGN) * CTX_ALIGN
    return batch * per_seq


class PlainDecoder:
    """Greedy plain decoding of a batch of sequences on one llama.cpp context (see module docstring)."""

    def __init__(
        self, gguf: Path, batch: int, max_tokens: int, threads: int, flash_attn: bool, kv_dtype: str = "f16"
    ):
        lib = _lib()
        _quiet()
        lib.llama_backend_init()
        self.lib, self.batch = lib, batch
        mparams = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = context_size(batch, max_tokens)
        cparams.n_batch = cparams.n_ubatch = MAX_BATCH_TOKENS
        cparams.n_seq_max = batch
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.type_k = cparams.type_v = _ggml_type(kv_dtype)
        cparams.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.memory = lib.llama_get_memory(self.ctx)
        self._batch = lib.llama_batch_init(max(MAX_BATCH_TOKENS, batch), 0, batch)

    def close(self) -> None:
        lib = self.lib
        lib.llama_batch_free(self._batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)

    def _decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], logits) -> None:
        b = self._batch
        for i, (tok, pos, seq, want) in enumerate(zip(tokens, positions, seqs, logits)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _argmax(self, index: int) -> int:
        row = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, index), shape=(self.vocab,))
        return int(row.argmax())

    def prefill(self, prompt: Sequence[int]) -> tuple[float, int]:
        """Prefill ``prompt`` into sequence 0 and copy it to the others; returns (seconds, first token)."""
        t0 = time.perf_counter()
        for start in range(0, len(prompt), MAX_BATCH_TOKENS):
            chunk = prompt[start : start + MAX_BATCH_TOKENS]
            last = start + len(chunk) == len(prompt)
            self._decode(
                chunk,
                range(start, start + len(chunk)),
                [0] * len(chunk),
                [last and i == len(chunk) - 1 for i in range(len(chunk))],
            )
        seconds = time.perf_counter() - t0
        first = self._argmax(len(chunk) - 1)
        for seq in range(1, self.batch):
            self.lib.llama_memory_seq_cp(self.memory, 0, seq, 0, NO_MORE)
        self.prompt_len = len(prompt)
        return seconds, first

    def decode(self, first: int, steps: int) -> tuple[float, list[list[int]]]:
        """``steps`` greedy steps of every sequence from the prefill; (seconds, tokens per sequence)."""
        for seq in range(self.batch):
            self.lib.llama_memory_seq_rm(self.memory, seq, self.prompt_len, NO_MORE)
        nxt = [first] * self.batch
        out: list[list[int]] = [[] for _ in range(self.batch)]
        seqs = range(self.batch)
        t0 = time.perf_counter()
        for step in range(steps):
            self._decode(nxt, [self.prompt_len + step] * self.batch, seqs, [True] * self.batch)
            nxt = [self._argmax(i) for i in seqs]
            for s, tok in zip(out, nxt):
                s.append(tok)
        return time.perf_counter() - t0, out


class PromptLookupDecoder:
    """Batch-1 greedy prompt-lookup speculative decoding (``llama_cpp.llama_speculative``)."""

    def __init__(self, gguf: Path, max_tokens: int, threads: int, flash_attn: bool, kv_dtype: str = "f16"):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        _quiet()
        self.llm = llama_cpp.Llama(
            str(gguf),
            n_ctx=context_size(1, max_tokens),
            n_batch=MAX_BATCH_TOKENS,
            n_ubatch=MAX_BATCH_TOKENS,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=flash_attn,
            type_k=_ggml_type(kv_dtype),
            type_v=_ggml_type(kv_dtype),
            draft_model=LlamaPromptLookupDecoding(),
            logits_all=True,  # speculation needs every position's logits (and sizes its buffer by this flag)
            verbose=False,
        )

    def close(self) -> None:
        self.llm.close()

    def _run(self, prompt: Sequence[int], steps: int) -> list[int]:
        out = []
        for tok in self.llm.generate(list(prompt), temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) == steps:
                break
        return out

    def prefill(self, prompt: Sequence[int]) -> float:
        """Evaluate the prompt (and one token); later ``decode`` calls reuse it from the KV cache."""
        t0 = time.perf_counter()
        self._run(prompt, 1)
        return time.perf_counter() - t0

    def decode(self, prompt: Sequence[int], steps: int) -> tuple[float, list[int]]:
        """``steps`` tokens after ``prompt`` (whose KV is cached, bar its last token); (seconds, tokens)."""
        t0 = time.perf_counter()
        out = self._run(prompt, steps)
        return time.perf_counter() - t0, out
