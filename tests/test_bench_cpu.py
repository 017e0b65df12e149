"""The CPU benchmark harness: roofline byte counts (against a transformers model), the F32/F16 GGUF conversion
(against gguf's own dequantization), the kernel profile, and the peer table's arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_hf_model
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

from mlc_magicdec.bench import gguf_convert, memory, peers, profile, roofline
from mlc_magicdec.compile.config import ModelConfig
from mlc_magicdec.runtime.costmodel import ModelSpec
from mlc_magicdec.runtime.engine import Engine

FP32 = 4


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied embeddings; tied embeddings with qkv bias
def test_step_bytes_match_transformers(tmp_path, family):
    folder, model = make_tiny_hf_model(tmp_path, family)
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    # A step reads every parameter but the embedding table (its lm_head copy is read when tied).
    params = model.named_parameters()
    read = sum(p.numel() for n, p in params if "embed_tokens" not in n or cfg.tie_word_embeddings)
    spec = ModelSpec(cfg, FP32)
    assert roofline.weight_bytes(spec) == read * FP32
    context = 37
    with torch.no_grad():
        cache = model(torch.arange(3, 3 + context)[None], use_cache=True).past_key_values
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert roofline.kv_bytes(spec, context) == kv
    assert roofline.kv_bytes(ModelSpec(cfg, FP32, kv_dtype_bytes=2), context) == kv // 2
    rows = roofline.roofline_rows(spec, [1, 4], [context], bandwidth=1e9)
    assert rows[1]["step_bytes"] == read * FP32 + 4 * kv
    assert rows[1]["max_tok_s"] == pytest.approx(4 * 1e9 / (read * FP32 + 4 * kv))


def test_triad_and_matmul_rates_are_plausible():
    rates = roofline.triad_bandwidth(threads=2, array_bytes=16 << 20, repeats=2)
    assert len(rates) == 2 and all(1e8 < r < 1e13 for r in rates)
    reads = roofline.read_bandwidth(threads=2, array_bytes=16 << 20, repeats=2)
    assert len(reads) == 2 and all(1e8 < r < 1e13 for r in reads)
    assert 1e8 < roofline.matmul_flops(threads=1, size=256, repeats=2) < 1e14


def _tiny_gguf(path):
    """A GGUF with a Q4_1 matrix, a Q8_0 matrix, an F32 vector and metadata of several types."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    e = rng.standard_normal((4, 32)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_token_list(["<a>", "<b>", "c"])
    writer.add_file_type(int(LlamaFileType.MOSTLY_Q4_1))
    writer.add_tensor(
        "blk.0.ffn_up.weight", quantize(w, GGMLQuantizationType.Q4_1), raw_dtype=GGMLQuantizationType.Q4_1
    )
    writer.add_tensor(
        "token_embd.weight", quantize(e, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("blk.0.ffn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_conversion_keeps_weights_and_metadata(tmp_path, dtype):
    src = tmp_path / "tiny.Q4_1.gguf"
    _tiny_gguf(src)
    out = gguf_convert.convert(src, dtype)
    assert out == tmp_path / f"tiny.Q4_1.{dtype.upper()}.gguf"
    a, b = GGUFReader(src), GGUFReader(out)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    wide = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16}[dtype]
    for ta, tb in zip(a.tensors, b.tensors):
        assert list(ta.shape) == list(tb.shape)
        expected = dequantize(ta.data, ta.tensor_type).reshape(-1)
        if len(ta.shape) == 1:
            assert tb.tensor_type == GGMLQuantizationType.F32  # norms stay F32, as llama.cpp writes them
        else:
            assert tb.tensor_type == wide
            expected = expected.astype(np.float16 if dtype == "f16" else np.float32)
        np.testing.assert_array_equal(np.asarray(tb.data).reshape(-1), expected)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}[dtype]
    assert b.get_field("general.file_type").contents() == int(file_type)
    for key in ("general.architecture", "llama.block_count", "tokenizer.ggml.tokens"):
        assert b.get_field(key).contents() == a.get_field(key).contents()
    eps = b.get_field("llama.attention.layer_norm_rms_epsilon")
    assert eps.types[0] == GGUFValueType.FLOAT32 and eps.contents() == pytest.approx(1e-5)
    assert gguf_convert.convert(src, dtype) == out  # cached


def test_gguf_conversion_rejects_unknown_dtype(tmp_path):
    with pytest.raises(gguf_convert.ConversionError, match="unknown GGUF dtype"):
        gguf_convert.convert(tmp_path / "x.gguf", "q2")


def test_llama_gguf_uses_the_shipped_file_for_its_own_type(tmp_path):
    src = tmp_path / "model.Q4_1.gguf"
    assert peers.llama_gguf(src, "q4_1") == src


def test_profile_times_every_kernel_of_a_step(tiny_models):
    _, model, artifact = tiny_models("llama")
    engine = Engine(artifact, threads=1)
    layers = model.config.num_hidden_layers
    for step, attention in (
        ("decode", "dense_attention_cpu"),
        ("verify", "dense_attention_cpu"),
        ("draft", "sparse_attention_cpu"),
    ):
        kernels, wall = profile.profile_step(engine, step, 2, context=100, gamma=2, budget=48, repeats=2)
        by_name = {k.name: k for k in kernels}
        assert by_name[attention].calls == layers
        assert by_name["kv_append_cpu"].calls == layers
        total = sum(k.seconds for k in kernels if profile.is_kernel(k.name))
        assert 0 < total <= wall
        assert kernels == sorted(kernels, key=lambda k: -k.seconds)


def _row(system, tok_s, batch=8, context=8192, prefill=100.0):
    return {
        "system": system,
        "batch": batch,
        "context": context,
        "decode_tok_s": tok_s,
        "prefill_tok_s": prefill,
        "llama_as_shipped": system.startswith("llama.cpp Q4_1 KV F16 "),
    }


def test_ratios_and_targets():
    """The targets compare with llama.cpp as shipped (Q4_1 weights, F16 KV), never a converted copy."""
    rows = [
        _row(peers.OURS_PLAIN, 40.0, prefill=300.0),
        _row("ours, MagicDec (snapkv/auto, gamma auto)", 60.0, prefill=300.0),
        _row(peers.TRANSFORMERS, 10.0, prefill=400.0),
        _row("llama.cpp F32 KV F32 (flash attn off)", 55.0),  # faster, but not as shipped
        _row("llama.cpp Q4_1 KV F16 (flash attn off)", 25.0, prefill=150.0),
        _row("llama.cpp Q4_1 KV F16 (flash attn on)", 20.0, prefill=250.0),
    ]
    peers.add_ratios(rows)
    assert rows[2]["plain_ratio"] == 4.0 and rows[4]["magicdec_ratio"] == 2.4
    assert peers.best_peer(rows, 8, 8192)["system"] == "llama.cpp F32 KV F32 (flash attn off)"
    lines = peers.target_lines(rows, {(8, 8192): 0.8})
    assert "read bandwidth used, plain, batch 8 x 8192: 80%" in lines  # reported; no target at 8 x 8k
    assert "plain vs transformers, batch 8 x 8192: 4.00x (target 1.0x: met)" in lines
    llama = "plain vs llama.cpp Q4_1 KV F16 (flash attn off), batch 8 x 8192: 1.60x"
    assert f"{llama} (target 2.0x: missed by 20%)" in lines
    magic = "MagicDec vs llama.cpp Q4_1 KV F16 (flash attn off), batch 8 x 8192: 2.40x"
    assert f"{magic} (target 2.5x: missed by 4%)" in lines
    assert not any(line.startswith("prefill") for line in lines)  # set at batch 1
    single = [
        {**r, "batch": 1, "context": 1024}
        for r in rows + [_row("llama.cpp Q4_1 KV F16 prompt-lookup (flash attn off)", 45.0, prefill=150.0)]
    ]
    peers.add_ratios(single)
    lines = peers.target_lines(single, {(1, 1024): 0.35})
    assert "read bandwidth used, plain, batch 1 x 1024: 35% (target 70%: missed by 50%)" in lines
    llama = "plain vs llama.cpp Q4_1 KV F16 (flash attn off), batch 1 x 1024"
    assert f"{llama}: 1.60x (target 1.0x: met)" in lines
    assert "prefill vs transformers, batch 1 x 1024: 0.75x (target 1.0x: missed by 25%)" in lines
    assert "prefill vs llama.cpp Q4_1 KV F16 (flash attn on), batch 1 x 1024: 1.20x" in " ".join(lines)
    assert not any(line.startswith("MagicDec") for line in lines)  # set at 8k
    at_8k = [{**r, "context": 8192} for r in single]
    peers.add_ratios(at_8k)
    magic = "MagicDec vs llama.cpp Q4_1 KV F16 prompt-lookup (flash attn off), batch 1 x 8192: 1.33x"
    assert f"{magic} (target 1.3x: met)" in peers.target_lines(at_8k, {})


def test_cli_bench_grid_writes_the_grid_plan_calibrates_against(tiny_models, tmp_path, monkeypatch):
    """``bench grid --json`` and ``plan --calibrate --against``: one writes what the other reads."""
    from test_errors import invoke

    monkeypatch.setenv("MLC_MAGICDEC_HOME", str(tmp_path))
    artifact = tiny_models("llama")[2]
    grid = tmp_path / "grid.json"
    cells = ("--batch", "1,2", "--context", "200", "--gamma", "1,2", "--budget", "64", "--threads", "1")
    result = invoke("bench", "grid", artifact, *cells, "--new-tokens", "16", "--repeats", "1", "--json", grid)
    assert result.exit_code == 0, result.output
    assert "MagicDec" in result.stdout and "command: " in result.stdout
    data = json.loads(grid.read_text())
    assert [(c["batch"], c["context"]) for c in data["cells"]] == [(1, 200), (2, 200)]
    assert set(data["acceptance"]["200"]["accepted_length"]) == {"snapkv/64/1", "snapkv/64/2"}
    result = invoke("plan", "--calibrate", artifact, "--quick", "--threads", "1", "--against", grid, "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)["predictions"]
    assert {p["quantity"] for p in predictions} == {"T_AR", "T_D", "T_V", "speedup"}


def _touch(nbytes: int) -> int:
    np.ones(nbytes // 8)  # written, so resident
    return memory.peak_resident_bytes()


def test_peak_resident_memory_counts_what_a_fresh_process_touched():
    mib = 1 << 20
    idle = memory._in_fresh_process(_touch, 0)
    busy = memory._in_fresh_process(_touch, 256 * mib)
    assert 250 * mib <= busy - idle <= 300 * mib


def test_cli_bench_memory_measures_ours_in_its_own_process(tiny_models, tmp_path):
    from test_errors import invoke

    artifact, out = tiny_models("llama")[2], tmp_path / "memory.json"
    cell = ("--batch", 2, "--context", 96, "--new-tokens", 8)
    result = invoke("bench", "memory", artifact, *cell, "--json", out)
    assert result.exit_code == 0, result.output
    (ours,) = json.loads(out.read_text())["rows"]  # llama.cpp needs a GGUF source
    assert ours["system"] == "ours" and ours["model_bytes"] == memory.folder_bytes(artifact)
    assert ours["peak_resident_bytes"] > ours["model_bytes"]


@pytest.mark.parametrize("mode", ["grid", "peers", "profile", "auto", "roofline", "memory"])
def test_cli_bench_subcommands_refuse_a_missing_output_folder(tiny_models, tmp_path, mode):
    from test_errors import cli_error, invoke

    out = tmp_path / "missing" / "out.json"
    assert "does not exist" in cli_error(invoke("bench", mode, tiny_models("llama")[2], "--json", out))
