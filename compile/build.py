"""The build driver: model file -> artifact folder (library, weights, config, tokenizer).

The artifact is written to a temporary folder beside the output and renamed into place at the end, so an
interrupted or failed compile never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import tvm
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from tvm import relax
from tvm.contrib import tvmjs

from .. import __version__
from ..constants import DRAFT_KINDS, DTYPES, QUANTIZATIONS
from ..errors import UserError
from ..fileio import atomic_write_json
from ..hashing import file_sha256
from ..manifest import WEIGHTS_NAME, Manifest
from ..schedules import relax_pipeline
from . import cuda, opencl, sampling
from .config import ModelConfig
from .convert import convert, linear_sources, quantization_plan, unquantizable_width
from .loaders import load_model
from .model import LlamaModel
from .quantization import FLOAT_TYPES, GGUF_FALLBACK, GROUP_SIZE
from .targets import GPU_TARGETS, TargetPreset, resolve

LIBRARY_NAME = "model.so"
METAL_LIBRARY_NAME = "model.tar"  # Metal: objects to link into a dylib on macOS (``mlc-magicdec link``)
TOKENIZER_NAME = "tokenizer.json"
# GPU targets' weights unless told (MLC-LLM's defaults by activation dtype): 4-bit, the memory left to the KV
GPU_QUANTIZATION = {"float16": "q4f16_1", "float32": "q4f32_1"}
WEIGHT_SHARD_MB = 32  # shard size of params_shard_*.bin (MLC's default)


def artifact_cache() -> Path:
    """Where ``demo`` keeps its compiled artifacts (under ``$MLC_MAGICDEC_HOME``)."""
    from .fetch import home

    return home() / "artifacts"


class CompileError(UserError, ValueError):
    """A compile request that cannot be carried out; the message is one line."""


def export_model(cfg: ModelConfig, preset: TargetPreset, dtype: str, kv_dtype: str, formats=None):
    """The Relax module (the model's functions and the device sampling functions, ``sampling``) and its
    ordered parameter list for ``cfg`` on ``preset`` (``formats``: the quantized linears, see
    ``quantization``)."""
    model = LlamaModel(cfg, preset.target, dtype, kv_dtype, formats)
    model.to(dtype)
    mod, named_params = model.export_tvm(spec=model.get_spec())
    return sampling.add_functions(mod, cfg.vocab_size, preset.schedules in GPU_TARGETS), named_params


def library_name(preset: TargetPreset) -> str:
    """The library file of an artifact: a shared library, or (Metal) a tar of objects to link on macOS."""
    return METAL_LIBRARY_NAME if preset.kind == "metal" else LIBRARY_NAME


def entry_kernels(mod: tvm.IRModule) -> dict[str, list[str]]:
    """For each Relax entry point of a lowered module, the names of the TIR kernels it calls (host-side
    helpers such as the VM's shape functions are left out)."""
    prim_funcs = {
        gv.name_hint
        for gv, f in mod.functions.items()
        if isinstance(f, tvm.tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_host_func"))
    }
    kernels: dict[str, list[str]] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        called: set[str] = set()

        def visit(expr, called=called):
            if isinstance(expr, relax.Call):
                for callee in (expr.op, *expr.args):
                    if isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint in prim_funcs:
                        called.add(callee.name_hint)

        relax.analysis.post_order_visit(func.body, visit)
        kernels[gv.name_hint] = sorted(called)
    return kernels


def build_library(mod, preset: TargetPreset, folder: Path, kernel_prefix: str = "") -> dict:
    """Compile the Relax module with the target's schedules and write the library into ``folder``.

    Returns what the artifact config records about it: the library's name, the kernels of each entry point,
    for CUDA each kernel's registers, shared memory and spills per arch (the build fails on spills or too
    much shared memory; the library holds the kernels' fatbin, compiled here with nvcc), and
    for PoCL the kernel table (``compile.opencl``; its kernels are renamed with ``kernel_prefix``).
    """
    gpu = preset.schedules in GPU_TARGETS
    # TIR's common-subexpression elimination hides from TVM's barrier planner that the GPU attention
    # kernels' shared-memory indices depend on threadIdx (see schedules.gpu_attention); nvcc and Metal do
    # their own CSE.
    config = {"tirx.disable_cse_tir": True} if gpu else {}
    pocl = preset.codegen is not None
    with tvm.transform.PassContext(config=config):
        with preset.target:
            mod = relax_pipeline(preset.target, kernel_prefix)(mod)
        if gpu:
            from ..schedules.gpu import raise_for_unbound

            raise_for_unbound(mod)
        if pocl:
            with opencl.recording_kernels() as table:
                built = opencl.without_targets(mod)
                executable = relax.build(built, target=preset.codegen, relax_pipeline=None)
            opencl.drop_opencl_modules(executable.mod)
        else:
            executable = relax.build(mod, target=preset.target, relax_pipeline=None)
    info = {"library": library_name(preset), "kernels": entry_kernels(mod)}
    if pocl:
        info["kernel_table"] = opencl.write_kernel_table(table, folder)
    export = {}
    if preset.kind == "cuda":
        source = cuda.cuda_source(executable.mod)
        fatbin = cuda.compile_fatbin(source, preset.archs, preset.target)
        info["resources"] = cuda.resource_usage(source, preset.archs)
        cuda.check_resources(info["resources"])
        export["fpack_imports"] = cuda.pack_imports_with_fatbin(source, fatbin)
    executable.export_library(str(folder / info["library"]), **export)
    return info


def compile_model(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str = "llvm",
    dtype: str | None = None,
    kv_dtype: str | None = None,
    quantization: str | None = None,
    cpu: str | None = None,
    arch: str | list[str] | None = None,
    drafts: tuple[str, ...] = (),
    budget: int | None = None,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Compile ``model_path`` (GGUF file or HF folder) into the artifact folder ``output``.

    ``quantization`` (``constants.QUANTIZATIONS``) defaults to ``gguf`` for a GGUF file whose linears are
    quantized, compiled for the CPU; else ``none``."""
    output = Path(output)
    if output.exists() and not force:
        raise CompileError(f"{output} already exists; choose another -o or pass --force to replace it")
    for draft in drafts:
        if draft not in DRAFT_KINDS:
            raise CompileError(f"unknown draft {draft!r}; choose from: {', '.join(DRAFT_KINDS)}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise CompileError(
            f"unknown --quantization {quantization!r}; choose from: {', '.join(QUANTIZATIONS)}"
        )
    if budget is not None and budget < 1:
        raise CompileError(f"--budget must be a positive number of tokens, got {budget}")
    preset = resolve(target, cpu=cpu, arch=arch)
    dtype = dtype or preset.default_dtype
    kv_dtype = kv_dtype or dtype
    for option, value in (("--dtype", dtype), ("--kv-dtype", kv_dtype)):
        if value not in DTYPES:
            raise CompileError(f"unsupported {option} {value!r}; use {' or '.join(DTYPES)}")
        if preset.codegen is not None and value != "float32":
            raise CompileError(
                f"--target pocl runs float32 only (PoCL has no fp16 here), not {option} {value}"
            )
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
            quantization = quantization or _default_quantization(loaded, preset, dtype)
            formats = _quantization_formats(loaded, preset, quantization, quiet)
            with step(f"exporting graph ({cfg.family}, {cfg.num_layers} layers)"):
                mod, named_params = export_model(cfg, preset, dtype, kv_dtype, formats)
                names = [name for name, _ in named_params]
            with (
                step(f"converting weights ({quantization}, {dtype})"),
                contextlib.redirect_stdout(io.StringIO()),
            ):
                tvmjs.dump_tensor_cache(
                    convert(cfg, loaded.weights, names, dtype, formats, preset.linears_out_in),
                    str(tmp),
                    encode_format="raw",
                    shard_cap_mb=WEIGHT_SHARD_MB,
                    show_progress=False,
                )
                record_formats(tmp, formats)
            with step(f"building library for {preset.kind}"):
                build = json.dumps(
                    [cfg.to_dict(), dtype, kv_dtype, quantization, list(drafts), budget, __version__]
                )
                prefix = f"k{hashlib.sha256(build.encode()).hexdigest()[:8]}_"
                library = build_library(mod, preset, tmp, prefix if preset.codegen is not None else "")
            (tmp / TOKENIZER_NAME).write_text(loaded.tokenizer_json)
            Manifest(
                model=cfg.to_dict(),
                source=str(model_path),
                dtype=dtype,
                kv_dtype=kv_dtype,
                quantization=quantization,
                target=preset.describe(),
                param_names=names,
                hashes={
                    "library": file_sha256(tmp / library["library"]),
                    "weights": file_sha256(tmp / WEIGHTS_NAME),
                    **(
                        {"kernel_table": file_sha256(tmp / library["kernel_table"])}
                        if "kernel_table" in library
                        else {}
                    ),
                },
                version=__version__,
                drafts=list(drafts),
                draft_budget=budget,
                compile_seconds=timings,
                chat_template=loaded.chat_template,
                **library,
            ).save(tmp)
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


def _stored_types(loaded) -> set[str]:
    """How the model file stores its linears' weights (GGML type names, or "float")."""
    return {loaded.weights.stored_type(p) for parts in linear_sources(loaded.config).values() for p in parts}


def _default_quantization(loaded, preset: TargetPreset, dtype: str) -> str:
    """What a user wants unless told: a quantized GGUF stays quantized (``gguf``: its blocks are the model
    its author shipped; re-quantizing SmolLM2's Q4_1 to q4f16_1 agrees with it on 57% of top-1 tokens);
    float weights become ``GPU_QUANTIZATION[dtype]`` on GPUs and stay float on CPUs; PoCL tests float32
    weights (``none``)."""
    if preset.codegen is not None:
        return "none"
    if _stored_types(loaded) - set(FLOAT_TYPES):
        return "gguf"
    return GPU_QUANTIZATION[dtype] if preset.schedules in GPU_TARGETS else "none"


def _quantization_formats(loaded, preset: TargetPreset, quantization: str, quiet: bool) -> dict:
    """The format of each quantized linear; CompileError for a request this model or target cannot take."""
    cfg, source = loaded.config, loaded.source
    if quantization == "none":
        return {}
    if quantization == "gguf" and _stored_types(loaded) <= set(FLOAT_TYPES):
        raise CompileError(
            f"--quantization gguf keeps a GGUF file's quantized blocks, and {source} has none; "
            "use --quantization q4f16_1 or none"
        )
    width = unquantizable_width(cfg)
    if width is not None:
        raise CompileError(
            f"--quantization {quantization} needs linear input widths that are multiples of {GROUP_SIZE}; "
            f"this model has {width}; use --quantization none"
        )
    formats, requantized = quantization_plan(cfg, loaded.weights, quantization)
    half = sorted({f.name for f in formats.values() if f.scale_dtype != "float32"})
    if preset.codegen is not None and half:
        raise CompileError(
            f"--target pocl runs float32 only (PoCL has no fp16 here), and {', '.join(half)} has float16 "
            "scales; use --quantization q4f32_1 or none"
        )
    if requantized and not quiet:
        sources = linear_sources(cfg)
        kinds = sorted({loaded.weights.stored_type(p) for linear in requantized for p in sources[linear]})
        Console(stderr=True).print(
            f"note: {len(requantized)} linears are stored as {', '.join(kinds)}, which has no kernel here; "
            f"re-quantized to {GGUF_FALLBACK}",
            highlight=False,
            soft_wrap=True,
        )
    return formats


def record_formats(folder: Path, formats: dict) -> None:
    """Write each quantized tensor's format into the folder's ``tensor-cache.json`` records."""
    path = folder / WEIGHTS_NAME
    cache = json.loads(path.read_text())
    for shard in cache["records"]:
        for record in shard["records"]:
            linear, _, tensor = record["name"].rpartition(".")
            if linear in formats and tensor in formats[linear].tensors:
                record["quantization"] = {"format": formats[linear].name, "group_size": GROUP_SIZE}
    atomic_write_json(path, cache)


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
