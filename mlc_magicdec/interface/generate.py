"""``generate`` and ``demo``: decode prompts with a compiled artifact and print what happened."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from ..bench import report
from ..compile.build import artifact_cache, compile_model
from ..compile.fetch import DEFAULT_MODEL, fetch_model
from ..manifest import Manifest, ManifestError
from ..runtime.engine import DEFAULT_GAMMA, Engine, GenerationResult, SpecSettings
from ..texts import DEMO_CHAPTERS, demo_prompt
from .console import results, status

DEMO_ARTIFACT = "smollm2-llvm"  # the demo's artifact, in the artifact cache


def generate(
    artifact: Path,
    prompts: Sequence[str],
    *,
    threads: int | None = None,
    draft_model: Path | None = None,
    **decode_args: Any,
) -> list[GenerationResult]:
    """Load ``artifact``, continue each prompt (``Engine.generate``'s arguments), print the texts and a
    table of rates and speculation figures."""
    with status.status("loading artifact"):
        engine = Engine(artifact, threads=threads, draft_model=draft_model)
    with status.status(f"generating for {len(prompts)} prompt(s)"):
        outputs = engine.generate(list(prompts), **decode_args)
    for i, r in enumerate(outputs):
        if len(outputs) > 1:
            click.echo(
                f"--- [{i}] ({r.prompt_tokens} prompt tokens, {len(r.token_ids)} new, {r.finish_reason})"
            )
        click.echo(r.text)
    results.print(report.generation_table(outputs))
    return outputs


def _is_current(artifact: Path) -> bool:
    """Whether ``artifact`` exists and this version can load it."""
    try:
        Manifest.load(artifact)
    except ManifestError:
        return False
    return True


def demo_artifact() -> Path:
    """SmolLM2 compiled for this CPU, in the artifact cache (compiled on first use)."""
    artifact = artifact_cache() / DEMO_ARTIFACT
    if not _is_current(artifact):
        compile_model(fetch_model(DEFAULT_MODEL), artifact, target="llvm", force=True)
    return artifact


def demo(
    *, max_new_tokens: int, threads: int | None = None, speculation: Mapping[str, Any]
) -> tuple[list[GenerationResult], list[GenerationResult]]:
    """Greedy plain and MagicDec decoding of one long Austen prompt, prefilled once, side by side.

    ``speculation`` holds ``Engine.decode``'s ``draft``, ``budget`` and ``gamma``. Prints the continuation,
    whether the two outputs are identical (they must be: greedy MagicDec is lossless), and a table of both
    rates, the acceptance and the speedup.
    """
    artifact = demo_artifact()
    with status.status("loading artifact"):
        engine = Engine(artifact, threads=threads)
    prompt = demo_prompt()
    max_gamma = SpecSettings(gamma=speculation.get("gamma", DEFAULT_GAMMA)).prefill_gamma()
    with status.status("prefilling the prompt"):
        batch = engine.prefill([prompt], max_new_tokens=max_new_tokens, max_gamma=max_gamma)
    with batch:
        status.print(
            f"prompt: Pride and Prejudice, chapters 1-{DEMO_CHAPTERS} ({len(batch.prompts[0])} tokens), "
            f"prefilled in {batch.prefill_seconds:.1f} s"
        )
        with status.status("decoding plainly"):
            plain = engine.decode(batch)
        with status.status("decoding with MagicDec"):
            magic = engine.decode(batch, speculate=True, **speculation)
    click.echo(plain[0].text)
    same = plain[0].token_ids == magic[0].token_ids
    budget = speculation.get("budget") or engine.default_budget()
    draft = speculation.get("draft") or engine.default_draft()
    setting = f"{draft}/{budget}, gamma {speculation.get('gamma')}"
    context = len(batch.prompts[0]) + max_new_tokens
    title = (
        f"plain vs MagicDec: {Path(engine.artifact.config.source).name} on "
        f"{engine.artifact.config.target['kind']}, "
        f"batch 1, context {context}, greedy, threads {engine.threads}"
    )
    results.print(report.comparison_table(title, plain, magic, setting))
    results.print(
        "identical output: " + ("yes (greedy MagicDec is lossless)" if same else "NO: please report this bug")
    )
    plain_rate, magic_rate = report.decode_rate(plain), report.decode_rate(magic)
    if plain_rate and magic_rate and magic_rate < plain_rate:
        results.print(
            "At batch 1 a self-draft step reads all of the target's weights, as a plain step does, so here "
            "speculation does not pay; MagicDec pays where the KV cache outweighs the weights (large batch, "
            "long context): see `mlc-magicdec bench grid` and `mlc-magicdec plan`."
        )
    return plain, magic
