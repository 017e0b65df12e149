"""``bench serve``: start the server (or use ``--url``), send the load, print the tables, write JSON and the
plot; ``--check`` compares every completed greedy response with its own single-request plain run."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from ..bench import serve_load, serve_report
from ..fileio import atomic_write_json
from ..manifest import Manifest, ManifestError
from ..runtime.artifact import ArtifactError
from ..runtime.engine import Engine
from ..runtime.serving import ServeConfig
from ..runtime.serving.async_engine import AsyncEngine
from ..texts import BENCH_NOVEL, read_text
from .console import check_output_folder, command_line, read_prompt, results, status
from .serve import BackgroundServer


def _header(artifact: Path, url: str | None, serving: ServeConfig, threads: int | None) -> str:
    try:
        cfg = Manifest.load(artifact)
    except ManifestError as e:
        raise ArtifactError(str(e)) from None
    where = f"server: {url}"
    if url is None:
        kv = serving.kv_capacity or "default"
        where = (
            f"server: in-process, max-running {serving.max_running}, max-batch-tokens "
            f"{serving.max_batch_tokens}, kv-capacity {kv}, threads {threads or 'default'}"
        )
    return (
        f"command: {command_line()} | model: {Path(cfg.source).name} "
        f"({cfg.model['family']}, {cfg.dtype_label}) | "
        f"target: {cfg.target['kind']} on {platform.processor() or platform.machine()} | {where}"
    )


def _check_plain(artifact: Path, threads: int | None, out: dict, output_tokens: int) -> dict:
    """Each completed response against its prompt decoded alone, plainly (once per prompt)."""
    engine = Engine(artifact, threads=threads)
    wanted: dict[int, str] = {}
    checked, mismatches = 0, []
    runs = out["runs"]
    with _bar() as bar:
        task = bar.add_task(
            "single-request plain runs",
            total=len(
                {r["index"] for run in runs for r in run["records"] if r["kind"] == "ok" and r["finish"]}
            ),
        )
        for run in runs:
            for rec in run["records"]:
                if rec["kind"] != "ok" or rec["error"] or rec["finish"] is None:
                    continue
                if rec["index"] not in wanted:
                    prompt = out["prompts"][rec["index"]]
                    wanted[rec["index"]] = engine.generate(
                        prompt, max_new_tokens=output_tokens, stop_at_eos=False
                    )[0].text
                    bar.advance(task)
                checked += 1
                if rec["text"] != wanted[rec["index"]]:
                    mismatches.append(f"{run['mode']} #{rec['index']}")
    return {"checked": checked, "mismatches": mismatches}


def _bar() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=status)


def serve_load_bench(
    artifact: Path,
    load: serve_load.LoadConfig,
    serving: ServeConfig,
    *,
    url: str | None = None,
    texts: Sequence[Path] = (),
    threads: int | None = None,
    check: bool = False,
    json_path: Path | None = None,
    plot_path: Path | None = None,
) -> dict:
    """Run the load benchmark against ``url`` or an in-process server of ``artifact``."""
    for path in (json_path, plot_path):
        check_output_folder(path)
    header = _header(artifact, url, serving, threads)
    tokenizer = Tokenizer.from_file(str(Path(artifact) / "tokenizer.json"))
    text = "\n".join(read_prompt(p) for p in texts) or read_text(BENCH_NOVEL)
    source = tokenizer.encode(text, add_special_tokens=False).ids
    if len(source) <= load.context[1]:
        raise ArtifactError(f"the prompt texts have {len(source)} tokens; the longest prompt needs more")
    server = None
    if url is None:
        with status.status("loading the artifact and calibrating"):
            server = BackgroundServer(AsyncEngine(artifact, serving, threads=threads), Path(artifact).name)
        url = server.url
    try:
        with _bar() as bar:

            def progress(label: str, total: int):
                task = bar.add_task(label, total=total)
                return lambda: bar.advance(task)

            out = serve_load.run(url, source, load, progress)
    finally:
        if server is not None:
            server.close()
    if check:
        out["plain_check"] = _check_plain(artifact, threads, out, load.output_tokens)
    out["header"] = header
    prompts = out.pop("prompts")
    results.print(header, highlight=False)
    lo, hi = load.context
    title = f"load: prompts of {lo}-{hi} tokens, {load.output_tokens} out, {load.requests} requests per run"
    results.print(serve_report.load_table(out, title))
    if len(load.modes) > 1 and "off" in load.modes:
        results.print(serve_report.ratio_table(out))
    if check:
        pc = out["plain_check"]
        results.print(
            f"greedy check: {pc['checked']} responses, {len(pc['mismatches'])} differ from their plain run"
        )
    results.print(
        f"after the load: /health {out['health_after']}, preemptions {out['preemptions_total']:.0f}"
    )
    if json_path:
        atomic_write_json(json_path, out)
    if plot_path:
        serve_report.plot_load(out, plot_path, title)
    out["prompts"] = prompts
    return out
