"""Bad input of every kind gets a one-line error, never a crash or a traceback, and leaves nothing behind.

Python API: a ``UserError`` subclass whose message has no newline. CLI: exit status 2 and exactly one line of
output, starting with "error:".
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import TINY_CONTEXT, TINY_VOCAB

from mlc_magicdec.cli import main
from mlc_magicdec.compile.build import compile_model
from mlc_magicdec.errors import UserError
from mlc_magicdec.runtime.artifact import CONFIG_NAME, ArtifactError
from mlc_magicdec.runtime.engine import Engine, RequestError

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def invoke(*args) -> Result:
    """Run the CLI with its output going to a pipe (as in CI, or ``2> log``).

    rich assumes 80 columns when the output is not a terminal; COLUMNS=80 makes that explicit, so that the
    result does not depend on the terminal pytest itself runs in.
    """
    return CliRunner(env={"COLUMNS": "80"}).invoke(main, [str(a) for a in args])


def cli_error(result: Result) -> str:
    """Assert exit status 2 and one output line starting with "error:" (no traceback); return that line."""
    out = ANSI.sub("", result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"crashed: {result.exception!r}\n{out}"
    assert "Traceback" not in out
    assert result.exit_code == 2, f"exit status {result.exit_code}, output:\n{out}"
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{out}"
    assert lines[0].startswith("error:"), out
    return lines[0]


def one_line(excinfo: pytest.ExceptionInfo, kind: type[Exception] = UserError) -> str:
    assert isinstance(excinfo.value, UserError) and isinstance(excinfo.value, kind), repr(excinfo.value)
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def assert_nothing_left(output: Path) -> None:
    assert not output.exists(), f"{output} was created"
    leftovers = list(output.parent.glob(f".{output.name}.*"))
    assert not leftovers, f"temporary folders left behind: {leftovers}"


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """``(hf_folder, artifact)`` of the tiny Llama (context window 512, character tokenizer)."""
    folder, _, artifact = tiny_models("llama")
    return folder, artifact


# ------------------------------------------------------------------------------------------------------
# compile


def _missing(tmp_path, tiny):
    return tmp_path / "nope.gguf", {}, "does not exist"


def _garbage(tmp_path, tiny):
    model = tmp_path / "garbage.gguf"
    model.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    return model, {}, "garbage.gguf"


def _gpt2(tmp_path, tiny):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, {}, "GPT2LMHeadModel"


def _target(name: str):
    return lambda tmp_path, tiny: (tiny[0], {"target": name}, name)


COMPILE_CASES = {
    "missing-model": _missing,
    "garbage-gguf": _garbage,
    "unsupported-architecture": _gpt2,
    "target-vulkan": _target("vulkan"),
    "target-cuda-bad-arch": lambda tmp_path, tiny: (tiny[0], {"target": "cuda", "arch": "5x"}, "5x"),
    "arch-without-cuda": lambda tmp_path, tiny: (tiny[0], {"arch": "89"}, "--arch applies to --target cuda"),
    "target-unknown": _target("tpu"),
    "budget-0": lambda tmp_path, tiny: (tiny[0], {"budget": 0}, "budget"),
    "budget-negative": lambda tmp_path, tiny: (tiny[0], {"budget": -5}, "budget"),
    "budget-at-context": lambda tmp_path, tiny: (tiny[0], {"budget": TINY_CONTEXT}, "budget"),
    "dtype-int3": lambda tmp_path, tiny: (tiny[0], {"dtype": "int3"}, "int3"),
    "kv-dtype-int8": lambda tmp_path, tiny: (tiny[0], {"kv_dtype": "int8"}, "--kv-dtype 'int8'"),
}


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compile_error_python_api(tmp_path, tiny, case):
    model, kwargs, expect = COMPILE_CASES[case](tmp_path, tiny)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        compile_model(model, out, quiet=True, **kwargs)
    assert expect in one_line(e)
    assert_nothing_left(out)


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compile_error_cli(tmp_path, tiny, case):
    model, kwargs, expect = COMPILE_CASES[case](tmp_path, tiny)
    out = tmp_path / "out"
    options = [x for k, v in kwargs.items() for x in (f"--{k.replace('_', '-')}", v)]
    result = invoke("compile", model, "-o", out, *options)
    assert_nothing_left(out)
    assert expect in cli_error(result)


def test_compile_truncated_real_gguf(tmp_path, smollm2_gguf):
    model = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        model.write_bytes(f.read(1 << 20))  # the first 1 MB
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        compile_model(model, out, quiet=True)
    assert "truncated.gguf" in one_line(e)
    assert_nothing_left(out)
    result = invoke("compile", model, "-o", out)
    assert_nothing_left(out)
    cli_error(result)


def test_compile_existing_output_without_force(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError) as e:
        compile_model(tiny[0], out, quiet=True)
    assert "--force" in one_line(e)
    result = invoke("compile", tiny[0], "-o", out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.*"))
    assert "--force" in cli_error(result)


# ------------------------------------------------------------------------------------------------------
# generate: Python API


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
    elif how == "no-library":
        library.unlink()
    elif how == "no-tensor-cache":
        (broken / "tensor-cache.json").unlink()
    elif how == "corrupt-config":
        (broken / CONFIG_NAME).write_text("{not json")
    elif how == "older-format":
        config = json.loads((broken / CONFIG_NAME).read_text())
        del config["format"]
        (broken / CONFIG_NAME).write_text(json.dumps(config))
    elif how == "empty-folder":
        shutil.rmtree(broken)
        broken.mkdir()
    elif how == "missing-folder":
        shutil.rmtree(broken)
    return broken


BROKEN = {  # how -> a word the message must hold
    "truncated-library": "model.so",
    "modified-library": "model.so",
    "no-library": "model.so",
    "no-tensor-cache": "tensor-cache.json",
    "corrupt-config": CONFIG_NAME,
    "older-format": "compile it again",
    "empty-folder": "artifact",
    "missing-folder": "artifact",
}


@pytest.mark.parametrize("how", BROKEN)
def test_broken_artifact_python_api(tmp_path, tiny, how):
    broken = _broken_artifact(tmp_path, tiny[1], how)
    with pytest.raises(ArtifactError) as e:
        Engine(broken)
    assert BROKEN[how] in one_line(e)


def test_hf_folder_is_not_an_artifact(tiny):
    with pytest.raises(ArtifactError) as e:
        Engine(tiny[0])
    assert "compile" in one_line(e)


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return Engine(tiny[1])


def test_prompt_longer_than_context(engine):
    with pytest.raises(RequestError) as e:
        engine.generate(["It is a truth universally acknowledged. " * 20])  # 800 characters: 800 tokens
    msg = one_line(e)
    assert str(TINY_CONTEXT) in msg and "800" in msg
    fits = "x" * (TINY_CONTEXT - 8)  # fits alone, but not with 9 new tokens
    with pytest.raises(RequestError) as e:
        engine.generate([fits], max_new_tokens=9)
    one_line(e)
    assert len(engine.generate([fits], max_new_tokens=8, stop_at_eos=False)[0].token_ids) == 8


@pytest.mark.parametrize("prompts", [[""], "", [[]], ["fine", ""], [], [[5, 6], []]],
                         ids=["empty-text", "bare-empty-text", "empty-ids", "second-empty", "no-prompts",
                              "second-empty-ids"])
def test_empty_prompt(engine, prompts):
    with pytest.raises(RequestError) as e:
        engine.generate(prompts)
    one_line(e)


@pytest.mark.parametrize("prompt", [[1, 2, 10**6], [TINY_VOCAB], [-1], [5, 2**31], [5, -(2**40)]])
def test_out_of_range_token_ids(engine, prompt):
    with pytest.raises(RequestError) as e:
        engine.generate([prompt], max_new_tokens=2)
    assert str(prompt[-1]) in one_line(e)
    assert len(engine.generate([[1, 2, 3]], max_new_tokens=2, stop_at_eos=False)[0].token_ids) == 2


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(temperature=-1.0),
                                    dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_arguments(engine, kwargs):
    with pytest.raises(RequestError) as e:
        engine.generate(["hi"], **kwargs)
    one_line(e)
    pages = engine.target.pages
    assert pages is None or pages.free_pages == pages.num_pages  # nothing stays reserved


def test_kv_pool_exhausted(tiny):
    prompt = list(range(3, 43))  # 40 tokens + 8 new = 48 token slots; the pool holds 32
    small = Engine(tiny[1], kv_capacity=32)
    with pytest.raises(UserError) as e:
        small.generate([prompt], max_new_tokens=8, stop_at_eos=False)
    assert "kv" in one_line(e).lower()
    # nothing left behind: after refusing a batch, the engine serves what fits, as a fresh engine does
    engine = Engine(tiny[1], kv_capacity=256)
    with pytest.raises(UserError) as e:
        engine.generate([prompt] * 10, max_new_tokens=8, stop_at_eos=False)  # 480 slots > 256
    assert "kv" in one_line(e).lower()
    got = engine.generate([prompt[:20]], max_new_tokens=8, stop_at_eos=False)[0].token_ids
    want = Engine(tiny[1]).generate([prompt[:20]], max_new_tokens=8, stop_at_eos=False)[0].token_ids
    assert got == want and len(got) == 8
    assert engine.target.pages.free_pages == engine.target.pages.num_pages  # every page released


def test_kv_capacity_serves_a_batch_that_fits(tiny):
    """kv_capacity is in tokens: 20 prompt tokens + 8 new ones fit in 32 slots (two pages of 16)."""
    engine = Engine(tiny[1], kv_capacity=32)
    [result] = engine.generate([list(range(3, 23))], max_new_tokens=8, stop_at_eos=False)
    assert len(result.token_ids) == 8


# ------------------------------------------------------------------------------------------------------
# generate: CLI


def test_cli_generate_works_on_the_test_artifact(tiny):
    """The control: the artifact the error cases start from is fine."""
    result = invoke("generate", tiny[1], "--prompt", "It is a truth", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "error" not in result.output


@pytest.mark.parametrize("how", BROKEN)
def test_cli_broken_artifact(tmp_path, tiny, how):
    broken = _broken_artifact(tmp_path, tiny[1], how)
    assert BROKEN[how] in cli_error(invoke("generate", broken, "--prompt", "hi")).replace("\n", "")


def test_cli_hf_folder_is_not_an_artifact(tiny):
    cli_error(invoke("generate", tiny[0], "--prompt", "hi"))


def test_cli_prompt_file_longer_than_context(tmp_path, tiny):
    long = tmp_path / "long.txt"
    long.write_text("It is a truth universally acknowledged. " * 20)  # 800 tokens
    assert str(TINY_CONTEXT) in cli_error(invoke("generate", tiny[1], "--prompt-file", long))


def test_cli_prompt_and_new_tokens_beyond_context(tiny):
    cli_error(invoke("generate", tiny[1], "--prompt", "x" * (TINY_CONTEXT - 8), "--max-new-tokens", "9"))


@pytest.mark.parametrize("args", [["--prompt", ""], [], ["--prompt", "hi", "--prompt", ""]],
                         ids=["empty", "none", "second-empty"])
def test_cli_empty_prompt(tiny, args):
    cli_error(invoke("generate", tiny[1], *args))


def test_cli_missing_prompt_file(tmp_path, tiny):
    assert "nope.txt" in cli_error(invoke("generate", tiny[1], "--prompt-file", tmp_path / "nope.txt"))


def test_cli_prompt_file_is_a_folder(tmp_path, tiny):
    cli_error(invoke("generate", tiny[1], "--prompt-file", tmp_path))


@pytest.mark.parametrize("option,value", [("--max-new-tokens", "0"), ("--temperature", "-1"),
                                          ("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "nan")])
def test_cli_bad_sampling_options(tiny, option, value):
    cli_error(invoke("generate", tiny[1], "--prompt", "hi", option, value))
