"""The build driver: model file -> artifact folder (library, weights, config, tokenizer).

The artifact is written to a temporary folder beside the output and renamed into place at the end, so an
interrupted or failed compile never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from tvm import relax
from tvm.contrib import tvmjs

from .. import __version__
from ..errors import UserError
from ..hashing import file_sha256
from ..runtime.artifact import ARTIFACT_FORMAT, CONFIG_NAME
from ..schedules import relax_pipeline
from .config import ModelConfig
from .convert import convert
from .loaders import load_model
from .model import LlamaModel
from .targets import TargetPreset, resolve

LIBRARY_NAME = "model.so"
TOKENIZER_NAME = "tokenizer.json"
WEIGHT_SHARD_MB = 32  # shard size of params_shard_*.bin (MLC's default)
DRAFT_KINDS = ("streamingllm", "snapkv")


def artifact_cache() -> Path:
    """Where ``demo`` keeps its compiled artifacts (under ``$MLC_MAGICDEC_HOME``)."""
    from .fetch import home

    return home() / "artifacts"


class CompileError(UserError, ValueError):
    """A compile request that cannot be carried out; the message is one line."""


def export_model(cfg: ModelConfig, preset: TargetPreset, dtype: str):
    """The Relax module and its ordered parameter list for ``cfg`` on ``preset``."""
    model = LlamaModel(cfg, preset.target, dtype)
    model.to(dtype)
    return model.export_tvm(spec=model.get_spec())


def build_library(mod, preset: TargetPreset, path: Path) -> None:
    """Compile the Relax module with the target's schedules and export the shared library."""
    executable = relax.build(mod, target=preset.target, relax_pipeline=relax_pipeline(preset.target))
    executable.export_library(str(path))


def compile_model(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str = "llvm",
    dtype: str | None = None,
    cpu: str | None = None,
    drafts: tuple[str, ...] = (),
    budget: int | None = None,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Compile ``model_path`` (GGUF file or HF folder) into the artifact folder ``output``."""
    output = Path(output)
    if output.exists() and not force:
        raise CompileError(f"{output} already exists; choose another -o or pass --force to replace it")
    for draft in drafts:
        if draft not in DRAFT_KINDS:
            raise CompileError(f"unknown draft {draft!r}; choose from: {', '.join(DRAFT_KINDS)}")
    if budget is not None and budget < 1:
        raise CompileError(f"--budget must be a positive number of tokens, got {budget}")
    preset = resolve(target, cpu=cpu)
    dtype = dtype or preset.default_dtype
    if dtype not in ("float32", "float16"):
        raise CompileError(f"unsupported dtype {dtype!r}; use float32 or float16")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    timings: dict[str, float] = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        # transient: the display is cleared at the end, so a failure leaves only its one-line error
        with Progress(*columns, disable=quiet, transient=True) as progress:

            def step(description: str):
                return _Step(progress, description, timings)

            with step("loading model"):
                loaded = load_model(model_path)
                cfg = loaded.config
            if budget is not None and budget >= cfg.context_window:
                raise CompileError(
                    f"--budget {budget} must be below the context window ({cfg.context_window})"
                )
            with step(f"exporting graph ({cfg.family}, {cfg.num_layers} layers)"):
                mod, named_params = export_model(cfg, preset, dtype)
                names = [name for name, _ in named_params]
            with step(f"converting weights to {dtype}"), contextlib.redirect_stdout(io.StringIO()):
                tvmjs.dump_tensor_cache(
                    convert(cfg, loaded.weights, names, dtype),
                    str(tmp),
                    encode_format="raw",
                    shard_cap_mb=WEIGHT_SHARD_MB,
                    show_progress=False,
                )
            with step(f"building library for {preset.kind}"):
                build_library(mod, preset, tmp / LIBRARY_NAME)
            (tmp / TOKENIZER_NAME).write_text(loaded.tokenizer_json)
            config = {
                "format": ARTIFACT_FORMAT,
                "version": __version__,
                "model": cfg.to_dict(),
                "source": str(model_path),
                "dtype": dtype,
                "target": preset.describe(),
                "library": LIBRARY_NAME,
                "param_names": names,
                "drafts": list(drafts),
                "draft_budget": budget,
                "hashes": {
                    "library": file_sha256(tmp / LIBRARY_NAME),
                    "weights": file_sha256(tmp / "tensor-cache.json"),
                },
                "compile_seconds": timings,
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
        if not quiet:
            steps = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
            Console(stderr=True).print(f"compiled {output} ({steps})", highlight=False, soft_wrap=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


class _Step:
    """A progress line that records how long its block took."""

    def __init__(self, progress: Progress, description: str, timings: dict[str, float]):
        self.progress, self.description, self.timings = progress, description, timings

    def __enter__(self):
        self.task = self.progress.add_task(self.description, total=None)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.description.split(" (")[0]] = round(time.perf_counter() - self.start, 2)
        self.progress.update(self.task, total=1, completed=1)
        return False
