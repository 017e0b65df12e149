"""``--target pocl``: the CUDA library's kernels, generated as OpenCL, run on the CPU by PoCL.

The artifact's layout is checked everywhere. Running it needs a PoCL that can compile kernels here; where
none can, those tests are skipped with the reason (PoCL 3.0's LLVM 14 knows no CPU newer than it, e.g. Zen 5).
Against the llvm artifact of the same model, through the runtime unchanged: prefill logits, greedy decoding,
and speculative decoding with both views.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_VOCAB

from mlc_magicdec.cli import main
from mlc_magicdec.compile.build import compile_model
from mlc_magicdec.compile.opencl import KERNEL_TABLE_NAME
from mlc_magicdec.manifest import CONFIG_NAME
from mlc_magicdec.runtime import opencl
from mlc_magicdec.runtime.artifact import ArtifactError
from mlc_magicdec.runtime.engine import Engine
from mlc_magicdec.schedules.gpu import MAX_KERNEL_NAME, prefixed_name

POCL_MISSING = opencl.available()
needs_pocl = pytest.mark.skipif(POCL_MISSING is not None, reason=f"PoCL cannot run here: {POCL_MISSING}")
PREFIX = re.compile(r"^k[0-9a-f]{8}_")


@pytest.fixture(scope="module")
def pocl_models(tiny_models, tmp_path_factory):
    """``get(family, quantization) -> (pocl artifact, llvm artifact)``, each compiled once."""
    cache = {}

    def get(family: str, quantization: str = "none"):
        if (family, quantization) not in cache:
            folder, _, llvm = tiny_models(family)
            root = tmp_path_factory.mktemp(f"pocl-{family}-{quantization}")
            pocl = compile_model(folder, root / "pocl", target="pocl", quantization=quantization, quiet=True)
            if quantization != "none":
                llvm = compile_model(folder, root / "llvm", quantization=quantization, quiet=True)
            cache[family, quantization] = (pocl, llvm)
        return cache[family, quantization]

    return get


def test_the_artifact_holds_a_kernel_table_and_no_opencl_module(pocl_models):
    artifact, _ = pocl_models("llama")
    config = json.loads((artifact / CONFIG_NAME).read_text())
    assert config["target"]["kind"] == "pocl" and config["target"]["device"] == "opencl:0"
    assert "cuda" in config["target"]["target"] and "opencl" in config["target"]["codegen"]
    assert config["kernel_table"] == KERNEL_TABLE_NAME and "kernel_table" in config["hashes"]
    table = json.loads((artifact / KERNEL_TABLE_NAME).read_text())
    assert table["kernels"] and all(PREFIX.match(name) for name in table["kernels"])
    for kernel in table["kernels"].values():
        assert kernel["launch"] and all(
            t.split(".")[0] in ("blockIdx", "threadIdx") for t in kernel["launch"]
        )
        assert "__kernel void" in table["programs"][kernel["program"]]
    # every entry point's kernels were renamed too, and the library carries no OpenCL source
    assert all(PREFIX.match(k) for kernels in config["kernels"].values() for k in kernels)
    assert b"__kernel" not in (artifact / config["library"]).read_bytes()
    # the CUDA schedules: the attention kernels' shared memory and barriers survive into the OpenCL code
    source = "\n".join(table["programs"])
    assert "__local" in source and "barrier(CLK_LOCAL_MEM_FENCE)" in source


def test_two_models_get_different_kernel_names(pocl_models):
    names = [
        set(json.loads((pocl_models(f)[0] / KERNEL_TABLE_NAME).read_text())["kernels"])
        for f in ("llama", "qwen2")
    ]
    assert not names[0] & names[1]


def test_float16_and_missing_pocl_are_one_line_errors(tiny_models, pocl_models, tmp_path, monkeypatch):
    folder = tiny_models("llama")[0]
    result = CliRunner().invoke(
        main, ["compile", str(folder), "--target", "pocl", "--dtype", "float16", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code != 0 and "float32 only" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()

    def missing():
        raise opencl.OpenCLUnavailable(
            f"no PoCL OpenCL platform here; this artifact needs one: {opencl.INSTALL}"
        )

    monkeypatch.setattr(opencl, "_queue", missing)
    with pytest.raises(ArtifactError, match="pyopencl") as e:
        Engine(pocl_models("llama")[0])
    assert "\n" not in str(e.value)


# q4f32_1: 4-bit codes and float32 scales (PoCL has no fp16), stored [out, in], the dequantize fused into the
# GPU GEMV and prefill GEMM, against the CPU's fused kernels of the same weights
MODELS = [("llama", "none"), ("qwen2", "none"), ("llama", "q4f32_1")]


@needs_pocl
@pytest.mark.parametrize(("family", "quantization"), MODELS)
def test_prefill_and_greedy_decoding_match_the_llvm_artifact(pocl_models, family, quantization):
    pocl, llvm = (Engine(a) for a in pocl_models(family, quantization))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, TINY_VOCAB, n).tolist() for n in (40, 75)]
    with pocl.prefill(prompts, max_new_tokens=8) as a, llvm.prefill(prompts, max_new_tokens=8) as b:
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    plain = [r.token_ids for r in llvm.generate(prompts, max_new_tokens=12, stop_at_eos=False)]
    assert [r.token_ids for r in pocl.generate(prompts, max_new_tokens=12, stop_at_eos=False)] == plain


@needs_pocl
@pytest.mark.parametrize("quantization", ["none", "q4f32_1"])
@pytest.mark.parametrize("draft", ["snapkv", "streamingllm"])
def test_speculative_decoding_on_pocl_is_lossless(pocl_models, draft, quantization):
    pocl, llvm = (Engine(a) for a in pocl_models("llama", quantization))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, TINY_VOCAB, n).tolist() for n in (60, 90)]
    plain = [r.token_ids for r in llvm.generate(prompts, max_new_tokens=10, stop_at_eos=False)]
    for gamma in (1, 3):
        runs = pocl.generate(
            prompts, max_new_tokens=10, stop_at_eos=False, speculate=True, draft=draft, budget=48, gamma=gamma
        )
        assert [r.token_ids for r in runs] == plain


def test_long_kernel_names_are_cut_and_kept_apart():
    """PoCL keeps a kernel's cache in a folder named after it: SmolLM2's 30 fused ``expand_dims`` made a name
    too long for a file name, and that kernel failed to link."""
    long_a, long_b = "fused_" + "expand_dims_" * 30 + "a", "fused_" + "expand_dims_" * 30 + "b"
    names = {prefixed_name("k0123abcd_", n) for n in (long_a, long_b, "rms_norm")}
    assert "k0123abcd_rms_norm" in names and len(names) == 3
    assert all(len(n) <= MAX_KERNEL_NAME and PREFIX.match(n) for n in names)
