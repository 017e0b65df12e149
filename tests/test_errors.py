"""Bad input of every kind gets a one-line error (CLI: exit status 2, one line starting with "error:"),
never a crash or a traceback, and leaves nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_CONTEXT, TINY_VOCAB
from mlc_magicdec.compile.build import compile_model
from mlc_magicdec.runtime.artifact import CONFIG_NAME, ArtifactError
from mlc_magicdec.runtime.engine import Engine, RequestError

from mlc_magicdec.cli import main
from mlc_magicdec.errors import UserError

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RICH_MARKUP = re.compile(r"\[/?(red|bold|green|yellow)[^\]]*\]")


def _visible(text: str) -> str:
    return RICH_MARKUP.sub("", ANSI.sub("", text))


def run_cli(*args: str) -> str:
    """Run the CLI; assert exit status 2 and one output line starting with "error:"; return that line.

    Output goes to a pipe, as in CI or ``2> log``: rich then assumes 80 columns (made explicit here so that
    the result does not depend on the terminal pytest runs in).
    """
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, [str(a) for a in args])
    out = _visible(result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"crashed: {result.exception!r}\n{out}"
    assert result.exit_code == 2, f"exit status {result.exit_code}, output:\n{out}"
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{out}"
    assert lines[0].startswith("error:"), out
    assert "Traceback" not in out
    return lines[0]


def assert_one_line(excinfo: pytest.ExceptionInfo, kind: type[Exception] = UserError) -> str:
    assert isinstance(excinfo.value, UserError) and isinstance(excinfo.value, kind), repr(excinfo.value)
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def assert_nothing_left(output: Path) -> None:
    assert not output.exists(), f"{output} was created"
    leftovers = list(output.parent.glob(f".{output.name}.*"))
    assert not leftovers, f"temporary folders left behind: {leftovers}"


# ------------------------------------------------------------------------------------------------------
# compile


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """``(hf_folder, artifact)`` of the tiny Llama (context window 512)."""
    folder, _, artifact = tiny_models("llama")
    return folder, artifact


def test_compile_missing_model(tmp_path):
    out = tmp_path / "out"
    line = run_cli("compile", tmp_path / "nope.gguf", "-o", out)
    assert "nope.gguf" in line and "does not exist" in line
    assert_nothing_left(out)
    with pytest.raises(UserError) as e:
        compile_model(tmp_path / "nope.gguf", out, quiet=True)
    assert_one_line(e)
    assert_nothing_left(out)


def test_compile_garbage_gguf(tmp_path):
    model = tmp_path / "garbage.gguf"
    model.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    run_cli("compile", model, "-o", out)
    assert_nothing_left(out)


def test_compile_truncated_real_gguf(tmp_path, smollm2_gguf):
    model = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        model.write_bytes(f.read(1 << 20))
    out = tmp_path / "out"
    line = run_cli("compile", model, "-o", out)
    assert "truncated.gguf" in line
    assert_nothing_left(out)


def test_compile_unsupported_architecture(tmp_path, tiny):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    line = run_cli("compile", folder, "-o", out)
    assert "GPT2LMHeadModel" in line
    assert_nothing_left(out)


@pytest.mark.parametrize("target", ["vulkan", "cuda", "tpu"])
def test_compile_unavailable_target(tmp_path, tiny, target):
    out = tmp_path / "out"
    line = run_cli("compile", tiny[0], "-o", out, "--target", target)
    assert target in line
    assert_nothing_left(out)


def test_compile_existing_output_without_force(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = run_cli("compile", tiny[0], "-o", out)
    assert "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched
    assert (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_compile_bad_budget(tmp_path, tiny, budget):
    out = tmp_path / "out"
    line = run_cli("compile", tiny[0], "-o", out, "--budget", budget)
    assert "budget" in line
    assert_nothing_left(out)


def test_compile_budget_beyond_context(tmp_path, tiny):
    out = tmp_path / "out"
    line = run_cli("compile", tiny[0], "-o", out, "--budget", str(TINY_CONTEXT))
    assert "budget" in line
    assert_nothing_left(out)


def test_compile_bad_dtype(tmp_path, tiny):
    out = tmp_path / "out"
    line = run_cli("compile", tiny[0], "-o", out, "--dtype", "int3")
    assert "int3" in line
    assert_nothing_left(out)


# ------------------------------------------------------------------------------------------------------
# generate


def test_generate_works_on_the_test_artifact(tiny):
    """The control: the artifact and prompts the error cases start from are fine."""
    result = CliRunner().invoke(main, ["generate", str(tiny[1]), "--prompt", "It is a truth",
                                       "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "error" not in result.output


def test_generate_not_an_artifact(tmp_path, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tiny[0], tmp_path / "missing"):
        line = run_cli("generate", folder, "--prompt", "hi")
        assert str(folder) in line
        with pytest.raises(ArtifactError) as e:
            Engine(folder)
        assert_one_line(e)


def test_generate_prompt_longer_than_context(tmp_path, tiny):
    long = tmp_path / "long.txt"
    long.write_text("It is a truth universally acknowledged. " * 20)  # 800 characters: 800 tokens
    line = run_cli("generate", tiny[1], "--prompt-file", long)
    assert str(TINY_CONTEXT) in line and "context" in line
    # fits alone, but not with the new tokens
    fits = "x" * (TINY_CONTEXT - 8)
    run_cli("generate", tiny[1], "--prompt", fits, "--max-new-tokens", "9")
    engine = Engine(tiny[1])
    with pytest.raises(RequestError) as e:
        engine.generate([long.read_text()])
    assert_one_line(e)
    with pytest.raises(RequestError) as e:
        engine.generate([fits], max_new_tokens=9)
    assert_one_line(e)
    assert len(engine.generate([fits], max_new_tokens=8, stop_at_eos=False)[0].token_ids) == 8


def test_generate_empty_prompt(tiny):
    run_cli("generate", tiny[1], "--prompt", "")
    run_cli("generate", tiny[1])  # no prompt at all
    engine = Engine(tiny[1])
    for prompts in ([""], "", [[]], ["fine", ""], []):
        with pytest.raises(RequestError) as e:
            engine.generate(prompts)
        assert_one_line(e)


def test_generate_missing_prompt_file(tmp_path, tiny):
    line = run_cli("generate", tiny[1], "--prompt-file", tmp_path / "nope.txt")
    assert "nope.txt" in line
    run_cli("generate", tiny[1], "--prompt-file", tmp_path)  # a folder


def test_generate_bad_token_ids(tiny):
    engine = Engine(tiny[1])
    for prompt in ([1, 2, 10**6], [TINY_VOCAB], [-1], [5, 2**31]):
        with pytest.raises(RequestError) as e:
            engine.generate([prompt], max_new_tokens=2)
        assert_one_line(e)
    # still fine afterwards
    assert len(engine.generate([[1, 2, 3]], max_new_tokens=2)[0].token_ids) >= 1


@pytest.mark.parametrize("option,value", [("--max-new-tokens", "0"), ("--temperature", "-1"),
                                          ("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "nan")])
def test_generate_bad_sampling_options(tiny, option, value):
    run_cli("generate", tiny[1], "--prompt", "hi", option, value)


def test_generate_kv_pool_exhausted(tiny):
    prompt = list(range(3, 43))  # 40 tokens + 8 new = 48 token slots; the pool holds 32
    small = Engine(tiny[1], kv_capacity=32)
    with pytest.raises(UserError) as e:
        small.generate([prompt], max_new_tokens=8, stop_at_eos=False)
    assert "kv" in assert_one_line(e).lower()
    # nothing left behind: after refusing a batch, the engine serves what fits, as a fresh engine does
    engine = Engine(tiny[1], kv_capacity=256)
    with pytest.raises(UserError) as e:
        engine.generate([prompt] * 10, max_new_tokens=8, stop_at_eos=False)  # 480 slots > 256
    assert "kv" in assert_one_line(e).lower()
    got = engine.generate([prompt[:20]], max_new_tokens=8, stop_at_eos=False)[0].token_ids
    want = Engine(tiny[1]).generate([prompt[:20]], max_new_tokens=8, stop_at_eos=False)[0].token_ids
    assert got == want and len(got) == 8
    assert engine.target.pages.free_pages == engine.target.pages.num_pages  # every page released


def test_kv_capacity_serves_a_batch_that_fits(tiny):
    """kv_capacity is in tokens: 20 prompt tokens + 8 new ones fit in 32 slots (two pages of 16)."""
    engine = Engine(tiny[1], kv_capacity=32)
    [result] = engine.generate([list(range(3, 23))], max_new_tokens=8, stop_at_eos=False)
    assert len(result.token_ids) == 8


def _broken_artifact(tmp_path: Path, artifact: Path, how: str) -> Path:
    broken = tmp_path / f"broken-{how}"
    shutil.copytree(artifact, broken)
    library = broken / json.loads((broken / CONFIG_NAME).read_text())["library"]
    if how == "truncated-library":
        library.write_bytes(library.read_bytes()[:4096])
    elif how == "modified-library":
        data = bytearray(library.read_bytes())
        data[len(data) // 2] ^= 0xFF
        library.write_bytes(bytes(data))
    elif how == "no-tensor-cache":
        (broken / "tensor-cache.json").unlink()
    elif how == "no-library":
        library.unlink()
    elif how == "corrupt-config":
        (broken / CONFIG_NAME).write_text("{not json")
    return broken


@pytest.mark.parametrize("how", ["truncated-library", "modified-library", "no-tensor-cache", "no-library",
                                 "corrupt-config"])
def test_generate_broken_artifact(tmp_path, tiny, how):
    broken = _broken_artifact(tmp_path, tiny[1], how)
    run_cli("generate", broken, "--prompt", "hi")
    with pytest.raises(ArtifactError) as e:
        Engine(broken)
    msg = assert_one_line(e)
    if how.endswith("library"):
        assert "model.so" in msg or "library" in msg
    if how == "no-tensor-cache":
        assert "tensor-cache.json" in msg
