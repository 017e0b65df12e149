"""Memory of a decoding batch: ours against llama.cpp as shipped, each system in a process of its own.

Each system runs in a fresh interpreter (``multiprocessing`` "spawn"), loads its model, prefills ``batch``
prompts and decodes ``new_tokens`` greedy tokens of each; its figure is that process's peak resident set
(``VmHWM``: weights, KV cache, activations and the runtime itself). Ours loads TVM as ``serve`` does, without
its compiler, and without torch, which the runtime does not depend on (``_as_served``). Ours prefills every
prompt; llama.cpp prefills the first and copies its KV into every sequence's stream
(``llamacpp.PlainDecoder``), which holds the same number of KV entries. Sizes on disk: the artifact folder
and the GGUF it was compiled from.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
from pathlib import Path

from ..tvm_loading import runtime_only
from . import llamacpp

KIB = 1024
OURS = "ours"


def peak_resident_bytes() -> int:
    """This process's peak resident set size (``VmHWM`` on Linux, else ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file itself)."""
    path = Path(path)
    return (
        path.stat().st_size
        if path.is_file()
        else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    )


def _as_served(artifact: str) -> None:
    """Load TVM as ``serve`` does (its runtime alone for a CPU artifact), and make ``import torch`` fail, as
    it does where only the runtime is installed: tvm_ffi imports torch whenever it can (here the test extras
    install it), about 200 MB that no code of ours uses (``transformers`` is a peer, not a dependency)."""
    runtime_only([Path(artifact)])
    sys.modules["torch"] = None


def _ours(artifact: str, threads: int, prompts: list[list[int]], new_tokens: int) -> int:
    _as_served(artifact)
    from ..runtime.engine import Engine

    engine = Engine(artifact, threads=threads)
    with engine.prefill(prompts, max_new_tokens=new_tokens, max_gamma=0) as batch:
        engine.decode(batch, stop_at_eos=False)
    return peak_resident_bytes()


def _llama(gguf: str, threads: int, prompts: list[list[int]], new_tokens: int, flash_attn: bool) -> int:
    dec = llamacpp.PlainDecoder(Path(gguf), len(prompts), len(prompts[0]) + new_tokens, threads, flash_attn)
    try:
        _, first = dec.prefill(prompts[0])
        dec.decode(first, new_tokens - 1)
    finally:
        dec.close()
    return peak_resident_bytes()


def _in_fresh_process(fn, *args) -> int:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def measure(
    artifact: Path, source: Path, prompts: list[list[int]], new_tokens: int, threads: int, flash_attn: bool
) -> list[dict]:
    """One row per system: its peak resident bytes decoding ``prompts``, and its model's bytes on disk."""
    rows = [
        {
            "system": OURS,
            "peak_resident_bytes": _in_fresh_process(_ours, str(artifact), threads, prompts, new_tokens),
            "model_bytes": folder_bytes(artifact),
        }
    ]
    if llamacpp.available() and source.suffix == ".gguf":
        peak = _in_fresh_process(_llama, str(source), threads, prompts, new_tokens, flash_attn)
        rows.append({"system": "llama.cpp", "peak_resident_bytes": peak, "model_bytes": folder_bytes(source)})
    return rows
