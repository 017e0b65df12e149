"""Quantized linear weights (``--quantization``): the GGUF block reader against ``gguf.quants``, the packed
layout, the dequantize-fused matmul kernels against numpy for every format, tiny models and SmolLM2 against
their float artifacts, losslessness within each quantized artifact, and the refusals."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import tvm
from test_kv_dtype import assert_lossless, logits_at_every_position
from test_loaders import _tiny_hf, _write_gguf, tiny_tokenizer  # noqa: F401 - a fixture
from tvm import relax
from tvm.relax.frontend import nn

from mlc_magicdec.compile.build import CompileError, compile_model
from mlc_magicdec.compile.loaders.gguf import gguf_blocks
from mlc_magicdec.compile.model import Linear
from mlc_magicdec.compile.quantization import FORMATS, GROUP_SIZE, quantize
from mlc_magicdec.compile.targets import resolve
from mlc_magicdec.runtime.engine import Engine
from mlc_magicdec.schedules import relax_pipeline

GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0")
SCHEMES = ("q4f16_1", "q4f32_1", "q8f16_1")
KERNEL_RTOL = 1e-5  # float32 matmul of the same dequantized numbers, summed in another order
TINY_LOGITS_ATOL = 1e-4  # the same weights as the float artifact: only summation order differs
SMOLLM2_LOGITS_ATOL = 1e-3
SMOLLM2_GREEDY = 64
Q8_TOP1 = 0.97  # q8f16_1 of SmolLM2's Q4_1 weights against them (measured 0.979)


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_blocks_are_read_as_gguf_dequantizes_them(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    w = _weights(48, 4 * GROUP_SIZE)
    raw = gguf.quants.quantize(w, qtype)
    ours = gguf_blocks(raw, type_name, w.shape)
    assert ours.fmt.name == type_name and ours.codes.max() < (1 << ours.fmt.bits)
    np.testing.assert_array_equal(ours.dequantize(), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("name", SCHEMES)
def test_quantize_is_symmetric_round_to_nearest(name):
    fmt = FORMATS[name]
    w = _weights(8, 2 * GROUP_SIZE)
    q = quantize(w, fmt)
    groups = w.reshape(8, 2, GROUP_SIZE)
    step = np.abs(groups).max(axis=2, keepdims=True) / fmt.max_magnitude
    err = np.abs(q.dequantize().reshape(groups.shape) - groups)
    assert (err <= step * 0.5 * (1 + 1e-2) + 1e-3 * step).all()  # half a step (fp16 scales round a little)


@pytest.mark.parametrize("name", ["Q4_1", "q8f16_1"])
def test_packed_codes_unpack_to_the_codes(name):
    fmt = FORMATS[name]
    w = _weights(40, 3 * GROUP_SIZE)
    q = (
        gguf_blocks(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1), name, w.shape)
        if name == "Q4_1"
        else quantize(w, fmt)
    )
    packed = q.packed()
    words = packed["codes"]  # [in / per_word, out]
    per = fmt.codes_per_word
    unpacked = (words[:, None, :] >> (np.arange(per, dtype=np.uint32) * fmt.bits)[None, :, None]) & (
        (1 << fmt.bits) - 1
    )
    np.testing.assert_array_equal(unpacked.reshape(-1, w.shape[0]).T, q.codes)
    np.testing.assert_array_equal(packed["scale"], q.scale.T)


def _linear_vm(fmt, in_features: int, out_features: int, bias: bool):
    class One(nn.Module):
        def __init__(self):
            self.linear = Linear(in_features, out_features, bias, fmt)

        def forward(self, x):
            return self.linear(x)

    module = One()
    module.to("float32")
    spec = {
        "x": nn.spec.Tensor(["n", in_features], "float32"),
        "$": {"param_mode": "packed", "effect_mode": "none"},
    }
    mod, params = module.export_tvm(spec={"forward": spec})
    target = resolve("llvm").target
    with target:
        lowered = relax_pipeline(target, "")(mod)
    kernels = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    vm = relax.VirtualMachine(relax.build(lowered, target=target, relax_pipeline=None), tvm.cpu())
    return vm, [name.split(".")[-1] for name, _ in params], kernels


@pytest.mark.parametrize("name", [*SCHEMES, *GGUF_TYPES, "none"])
@pytest.mark.parametrize(("in_features", "out_features"), [(128, 192), (96, 40)])
def test_the_fused_kernel_matches_numpy(name, in_features, out_features):
    """One kernel per linear (dequantize fused into the matmul and its bias add), at decode, verify and
    prefill row counts; 40 outputs is not a whole register tile, so TVM's default schedule takes it. A
    token alone (its own loop nest) gets the very bits it gets inside a batch, which losslessness needs."""
    fmt = FORMATS.get(name)
    w = _weights(out_features, in_features, seed=1)
    if fmt is None:
        tensors, dequantized = {"weight": np.ascontiguousarray(w.T)}, w
    else:
        if name in GGUF_TYPES:
            q = gguf_blocks(gguf.quants.quantize(w, gguf.GGMLQuantizationType[name]), name, w.shape)
        else:
            q = quantize(w, fmt)
        tensors, dequantized = q.packed(), q.dequantize()
    bias = _weights(1, out_features, seed=2)[0]
    vm, names, kernels = _linear_vm(fmt, in_features, out_features, bias=True)
    if fmt is not None:
        fused = [k for k in kernels if "dequantize" in k]
        assert len(fused) == 1 and "matmul" in fused[0] and "add" in fused[0], kernels
    args = [tvm.runtime.tensor({**tensors, "bias": bias}[n]) for n in names]
    outputs = {}
    for rows in (1, 3, 16, 133):
        x = _weights(rows, in_features, seed=rows)
        outputs[rows] = got = vm["forward"](tvm.runtime.tensor(x), args).numpy()
        want = x.astype(np.float64) @ dequantized.T.astype(np.float64) + bias
        np.testing.assert_allclose(got, want, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * np.abs(want).max())
    x = _weights(133, in_features, seed=133)
    for row in (0, 5, 132):
        alone = vm["forward"](tvm.runtime.tensor(x[row : row + 1]), args).numpy()
        np.testing.assert_array_equal(alone[0], outputs[133][row])


# ------------------------------------------------------------------------------------------------------
# Tiny models


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):  # noqa: F811 - the fixture imported above
    """``type_name -> (gguf artifact, float artifact)`` of one tiny Llama GGUF file in that type."""
    model, cache = _tiny_hf("llama"), {}

    def get(type_name: str):
        if type_name not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{type_name}")
            path = _write_gguf(
                root / "tiny.gguf", model, tiny_tokenizer, qtype=gguf.GGMLQuantizationType[type_name]
            )
            cache[type_name] = (
                compile_model(path, root / "gguf", quantization="gguf", quiet=True),
                compile_model(path, root / "float", quantization="none", quiet=True),
            )
        return cache[type_name]

    return get


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_tiny_gguf_blocks_are_kept_and_compute_what_the_float_artifact_does(tiny_gguf, type_name):
    quantized, floats = tiny_gguf(type_name)
    records = json.loads((quantized / "tensor-cache.json").read_text())["records"]
    formats = {r["name"]: r.get("quantization", {}).get("format") for s in records for r in s["records"]}
    assert formats["layers.0.self_attn.qkv_proj.codes"] == type_name
    assert formats["lm_head.scale"] == type_name and formats["norm.weight"] is None
    q, f = Engine(quantized), Engine(floats)
    assert q.artifact.config.quantization == "gguf"
    assert q.artifact.spec.weight_bytes < f.artifact.spec.weight_bytes / 3
    ids = list(range(3, 200))
    np.testing.assert_allclose(
        logits_at_every_position(q, ids), logits_at_every_position(f, ids), atol=TINY_LOGITS_ATOL
    )
    assert_lossless(q, [ids[:150], ids[40:]], budget=64)


def _dequantized_copy(folder, model, fmt, dst):
    """The HF model with every linear weight replaced by its ``fmt`` quantization, dequantized in numpy."""
    import copy
    import shutil

    import torch

    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "model.embed_tokens.weight":
                p.copy_(torch.from_numpy(quantize(p.numpy(), fmt).dequantize()))
    model.save_pretrained(dst)
    shutil.copy(folder / "tokenizer.json", dst / "tokenizer.json")
    return dst


@pytest.mark.parametrize("name", SCHEMES)
def test_tiny_schemes_compute_their_dequantized_weights_and_are_lossless(tiny_models, tmp_path, name):
    """Quantized from float weights (an untied lm_head, GQA), the artifact computes what a float artifact of
    the numpy-dequantized weights computes."""
    folder, model, _ = tiny_models("llama")
    engine = Engine(compile_model(folder, tmp_path / name, quantization=name, quiet=True))
    oracle = compile_model(
        _dequantized_copy(folder, model, FORMATS[name], tmp_path / "hf"), tmp_path / "f", quiet=True
    )
    ids = list(range(3, 120))
    np.testing.assert_allclose(
        logits_at_every_position(engine, ids),
        logits_at_every_position(Engine(oracle), ids),
        atol=TINY_LOGITS_ATOL,
    )
    assert_lossless(engine, [ids, ids[30:]], budget=64)


# ------------------------------------------------------------------------------------------------------
# SmolLM2 (its GGUF: Q4_1 linears, a Q8_0 embedding that is also the lm_head)


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-quantized")
    return (
        Engine(compile_model(smollm2_gguf, root / "gguf", quantization="gguf", quiet=True)),
        Engine(compile_model(smollm2_gguf, root / "float", quantization="none", quiet=True)),
    )


def test_smollm2_gguf_blocks_against_float32(smollm2_pair, austen_texts):
    quantized, floats = smollm2_pair
    ids = floats.encode(austen_texts["emma"][40000:52000])[:1000]
    assert len(ids) == 1000
    want, got = logits_at_every_position(floats, ids), logits_at_every_position(quantized, ids)
    assert np.abs(got[-1] - want[-1]).max() < SMOLLM2_LOGITS_ATOL
    options = dict(max_new_tokens=SMOLLM2_GREEDY, stop_at_eos=False)
    assert quantized.generate([ids], **options)[0].token_ids == floats.generate([ids], **options)[0].token_ids
    assert_lossless(quantized, [ids, floats.encode(austen_texts["emma"][90000:99000])[:700]], budget=128)


def test_smollm2_q8f16_1_against_float32(smollm2_gguf, smollm2_pair, austen_texts, tmp_path):
    floats = smollm2_pair[1]
    engine = Engine(compile_model(smollm2_gguf, tmp_path / "q8", quantization="q8f16_1", quiet=True))
    ids = floats.encode(austen_texts["persuasion"][30000:40000])[:1000]
    got, want = logits_at_every_position(engine, ids), logits_at_every_position(floats, ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= Q8_TOP1
    assert_lossless(engine, [ids[:600]], budget=128)


# ------------------------------------------------------------------------------------------------------
# Refusals


def test_bad_quantization_requests_are_refused_in_one_line(tiny_models, tmp_path):
    folder, _, _ = tiny_models("llama")
    cases = {
        "unknown": dict(quantization="q3f16_0"),
        "gguf on a float model": dict(quantization="gguf"),
        "fp16 scales on PoCL": dict(quantization="q4f16_1", target="pocl"),
    }
    for case, options in cases.items():
        with pytest.raises(CompileError) as e:
            compile_model(folder, tmp_path / "out", quiet=True, **options)
        assert "\n" not in str(e.value), case
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), case


def test_widths_that_are_not_whole_groups_are_refused(tmp_path, tiny_tokenizer):  # noqa: F811
    from test_loaders import _save_hf

    folder = _save_hf(_tiny_hf("llama", intermediate_size=80), tmp_path / "hf", tiny_tokenizer)
    with pytest.raises(CompileError, match="multiples of 32"):
        compile_model(folder, tmp_path / "out", quantization="q4f16_1", quiet=True)
    assert not (tmp_path / "out").exists()
