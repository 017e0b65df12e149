"""GPU targets without a GPU: SmolLM2 compiles for CUDA (sm_89, and a two-arch fatbin) and Metal, every entry
point's kernels are bound to GPU threads and present in the compiled binaries, Vulkan and a missing device are
one-line errors, and the CUDA compile stays under three minutes.

The fatbin is checked independently of TVM: its container is parsed here (header magic, then one entry per
image with its kind and SM version), and each SASS image must hold every kernel's symbol.
"""

from __future__ import annotations

import json
import struct
import sys
import tarfile
import time

import pytest
from click.testing import CliRunner
from tvm import te

from mlc_magicdec.cli import main
from mlc_magicdec.compile import sampling
from mlc_magicdec.compile.attention import PAGE_SIZE
from mlc_magicdec.compile.build import LIBRARY_NAME, METAL_LIBRARY_NAME, compile_model
from mlc_magicdec.compile.link import LinkError, link_metal
from mlc_magicdec.compile.targets import VULKAN_MISSING, TargetError, parse_archs, resolve
from mlc_magicdec.runtime.artifact import CONFIG_NAME, Artifact, ArtifactError
from mlc_magicdec.schedules import gpu_attention
from mlc_magicdec.schedules.gpu import UnboundKernelError, check_bindings, raise_for_unbound, unbound_kernels

ENTRY_POINTS = {"embed", "prefill", "decode", "verify", "draft", "snapkv_scores", *sampling.FUNCTIONS}
COMPILE_LIMIT_S = 180  # the bound on compiling SmolLM2 for cuda on the 2-core CI machines
FATBIN_MAGIC = 0xBA55ED50
FATBIN_ELF, FATBIN_PTX = 2, 1  # entry kinds of the fatbin container


def fatbin_entries(blob: bytes) -> list[tuple[int, int, bytes]]:
    """``(kind, sm, payload)`` of each image in a fatbin (``kind`` 2 = SASS ELF, 1 = PTX)."""
    magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", blob, 0)
    assert magic == FATBIN_MAGIC, "not a fatbin"
    entries, offset = [], header_size
    while offset < header_size + body_size:
        kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", blob, offset)
        sm = struct.unpack_from("<I", blob, offset + 28)[0]
        entries.append((kind, sm, blob[offset + entry_header : offset + entry_header + payload]))
        offset += entry_header + payload
    return entries


def library_fatbin(path) -> bytes:
    """The fatbin embedded in an artifact's model.so (from its container's magic on)."""
    library = (path / LIBRARY_NAME).read_bytes()
    at = library.find(struct.pack("<I", FATBIN_MAGIC))
    assert at >= 0, "model.so holds no fatbin"
    return library[at:]


def kernel_names(config: dict) -> dict[str, list[str]]:
    return config["kernels"]


@pytest.fixture(scope="session")
def cuda_artifact(smollm2_gguf, tmp_path_factory):
    """SmolLM2 compiled for --target cuda with no --arch (no GPU here: sm_89), and the seconds it took."""
    start = time.perf_counter()
    path = compile_model(
        smollm2_gguf, tmp_path_factory.mktemp("cuda") / "smollm2-cuda", target="cuda", quiet=True
    )
    return path, time.perf_counter() - start


@pytest.fixture(scope="session")
def metal_artifact(smollm2_gguf, tmp_path_factory):
    return compile_model(
        smollm2_gguf, tmp_path_factory.mktemp("metal") / "smollm2-metal", target="metal", quiet=True
    )


def _config(path) -> dict:
    return json.loads((path / CONFIG_NAME).read_text())


def test_cuda_artifact_is_fp16_sm89_and_compiles_fast(cuda_artifact):
    path, seconds = cuda_artifact
    config = _config(path)
    assert config["dtype"] == "float16"
    assert config["target"]["device"] == "cuda:0"
    assert config["target"]["archs"] == ["sm_89"]
    assert '"arch":"sm_89"' in config["target"]["target"]
    print(f"\ncompile SmolLM2 --target cuda: {seconds:.1f} s ({config['compile_seconds']})")
    assert seconds < COMPILE_LIMIT_S


def test_cuda_fatbin_holds_every_entry_points_kernels(cuda_artifact):
    path, _ = cuda_artifact
    config = _config(path)
    kernels = kernel_names(config)
    assert set(kernels) == ENTRY_POINTS
    assert all(kernels[name] for name in ENTRY_POINTS)
    # the attention op's kernels belong to the entry points that use them
    assert "dense_attention_gpu" in kernels["decode"] and "dense_attention_gpu" in kernels["verify"]
    assert "sparse_attention_gpu" in kernels["draft"] and "sparse_attention_gpu" not in kernels["decode"]
    assert "attention_scores_gpu" in kernels["snapkv_scores"]
    assert "kv_append_gpu" in kernels["prefill"]
    # prefill has its own tiled-GEMM copies of the matmuls; decode, verify and draft keep the GEMV ones
    prefill_gemms = [k for k in kernels["prefill"] if k.endswith("_prefill")]
    assert len(prefill_gemms) >= 4
    assert all(k.rsplit("_prefill", 1)[0] in kernels["verify"] for k in prefill_gemms)
    assert not any(k.endswith("_prefill") for entry in ("decode", "verify", "draft") for k in kernels[entry])
    entries = fatbin_entries(library_fatbin(path))
    sass = [(sm, payload) for kind, sm, payload in entries if kind == FATBIN_ELF]
    assert [sm for sm, _ in sass] == [89]
    assert any(kind == FATBIN_PTX for kind, _, _ in entries)  # PTX of the newest arch, for newer cards
    _, elf = sass[0]
    assert elf.startswith(b"\x7fELF")
    for entry, names in kernels.items():
        for name in names:  # a kernel left unbound would be host code, absent from the device binary
            assert f"{name}_kernel".encode() in elf, f"{entry}: kernel {name} is not in the sm_89 SASS"


def test_cuda_two_arch_build(smollm2_gguf, tmp_path):
    path = compile_model(smollm2_gguf, tmp_path / "two-arch", target="cuda", arch="80,89", quiet=True)
    config = _config(path)
    assert config["target"]["archs"] == ["sm_80", "sm_89"]
    assert '"arch":"sm_80"' in config["target"]["target"]  # codegen for the oldest card of the fatbin
    sass = [(sm, payload) for kind, sm, payload in fatbin_entries(library_fatbin(path)) if kind == FATBIN_ELF]
    assert sorted(sm for sm, _ in sass) == [80, 89]
    for _, elf in sass:
        for names in kernel_names(config).values():
            assert all(f"{name}_kernel".encode() in elf for name in names)


def test_cuda_artifact_on_a_machine_without_cuda_is_one_line(cuda_artifact):
    import tvm

    if tvm.runtime.cuda(0).exist:
        pytest.skip("this machine has a CUDA GPU")
    path, _ = cuda_artifact
    with pytest.raises(ArtifactError) as err:
        Artifact.load(path)
    message = str(err.value)
    assert "\n" not in message
    assert "cuda:0" in message and "does not have" in message
    result = CliRunner().invoke(main, ["generate", str(path), "--prompt", "Emma"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "cuda:0" in result.output


def test_metal_build_yields_tar_with_every_entry_points_kernels(metal_artifact):
    config = _config(metal_artifact)
    assert config["library"] == METAL_LIBRARY_NAME and config["dtype"] == "float16"
    assert config["target"]["device"] == "metal:0"
    assert "arm64-apple-darwin" in config["target"]["target"]
    with tarfile.open(metal_artifact / METAL_LIBRARY_NAME) as tar:
        objects = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert objects and all(name.endswith(".o") for name in objects)
    mach_o_arm64 = b"\xcf\xfa\xed\xfe\x0c\x00\x00\x01"  # MH_MAGIC_64, CPU_TYPE_ARM64
    assert all(blob.startswith(mach_o_arm64) for blob in objects.values())
    blob = b"".join(objects.values())
    assert set(kernel_names(config)) == ENTRY_POINTS
    for entry, names in kernel_names(config).items():
        for name in names:
            assert f"kernel void {name}_kernel".encode() in blob, f"{entry}: no Metal kernel {name}"


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the link step runs")
def test_metal_link_off_macos_is_one_line(metal_artifact):
    with pytest.raises(LinkError) as err:
        link_metal(metal_artifact)
    assert "\n" not in str(err.value) and "macOS" in str(err.value)
    with pytest.raises(ArtifactError):  # the unlinked tar is never loaded (no Metal device here either)
        Artifact.load(metal_artifact)


def _has_vulkan_codegen() -> bool:
    import tvm

    return tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None


@pytest.mark.skipif(_has_vulkan_codegen(), reason="this TVM has Vulkan codegen")
def test_vulkan_without_codegen_is_one_line(tmp_path, smollm2_gguf):
    with pytest.raises(TargetError) as err:
        compile_model(smollm2_gguf, tmp_path / "vk", target="vulkan", quiet=True)
    message = str(err.value)
    assert message == VULKAN_MISSING and "\n" not in message
    assert "USE_VULKAN=ON" in message and "MLC-LLM" in message
    assert not (tmp_path / "vk").exists()
    result = CliRunner().invoke(
        main, ["compile", str(smollm2_gguf), "--target", "vulkan", "-o", str(tmp_path / "vk")]
    )
    assert result.exit_code == 2 and result.output.strip() == f"error: {VULKAN_MISSING}"


def test_target_presets():
    assert parse_archs("80,86,89,90") == ("sm_80", "sm_86", "sm_89", "sm_90")
    assert parse_archs(["sm_90a", "89", "89"]) == ("sm_90a", "sm_89")
    for bad in ("5x", "sm_50", "", "80,,89x"):
        with pytest.raises(TargetError):
            parse_archs(bad)
    with pytest.raises(TargetError, match="--arch applies to --target cuda"):
        resolve("llvm", arch="89")
    cuda = resolve("cuda", arch="90,80")
    assert cuda.archs == ("sm_90", "sm_80") and cuda.target.attrs["arch"] == "sm_80"
    assert cuda.default_dtype == "float16" and cuda.device == "cuda:0"
    metal = resolve("metal")
    assert metal.default_dtype == "float16"
    assert str(metal.target.host.attrs["mtriple"]) == "arm64-apple-darwin"
    assert resolve("llvm").default_dtype == "float32"


def test_build_check_names_every_unbound_kernel():
    a = te.placeholder((64,), name="a")
    b = te.compute((64,), lambda i: a[i] * 2.0, name="b")
    unscheduled = te.create_prim_func([a, b])
    import tvm

    mod = tvm.IRModule({"double_it": unscheduled, "also_unbound": unscheduled})
    assert unbound_kernels(mod) == ["also_unbound (b)", "double_it (b)"]
    checked = check_bindings(mod)
    with pytest.raises(UnboundKernelError, match=r"2 GPU kernel.*: also_unbound \(b\), double_it \(b\);"):
        raise_for_unbound(checked)
    bound = tvm.IRModule({"kv_append": gpu_attention.kv_append(3, 64, PAGE_SIZE, "float16", "float16")})
    assert unbound_kernels(bound) == []
    raise_for_unbound(check_bindings(bound))  # nothing to report


@pytest.mark.parametrize(("quantization", "stored"), [(None, {"float32", "uint32"}), ("none", {"float32"})])
def test_dtype_overrides_the_gpu_default(tiny_models, tmp_path, quantization, stored):
    """--dtype float32 on a GPU target: fp32 KV pool and kernels, and weights in q4f32_1 (float32 scales), or
    float32 with --quantization none (tiny Llama, GQA, head_dim 16)."""
    folder, _, _ = tiny_models("llama")
    out = tmp_path / "tiny-cuda-fp32"
    path = compile_model(folder, out, target="cuda", dtype="float32", quantization=quantization, quiet=True)
    config = _config(path)
    assert config["dtype"] == config["kv_dtype"] == "float32"
    assert config["quantization"] == (quantization or "q4f32_1")
    records = json.loads((path / "tensor-cache.json").read_text())["records"]
    assert {p["dtype"] for shard in records for p in shard["records"]} == stored
    ((_, _, elf),) = [e for e in fatbin_entries(library_fatbin(path)) if e[0] == FATBIN_ELF]
    assert all(f"{k}_kernel".encode() in elf for names in kernel_names(config).values() for k in names)


def test_gpu_artifacts_keep_the_gguf_blocks_stored_out_in(cuda_artifact):
    """A quantized GGUF stays quantized on a GPU target unless told: SmolLM2's Q4_1 blocks (and its Q8_0
    lm_head) are kept, with fp16 KV, each linear stored ``[out, in]`` (codes ``[out, in / 8]``) for dlight's
    inner-reduction GEMV, which fuses the dequantize."""
    path, _ = cuda_artifact
    config = _config(path)
    assert config["quantization"] == "gguf" and config["kv_dtype"] == "float16"
    records = {
        r["name"]: r for shard in json.loads((path / "tensor-cache.json").read_text())["records"]
        for r in shard["records"]
    }
    hidden, inter = config["model"]["hidden_size"], config["model"]["intermediate_size"]
    assert records["layers.0.mlp.down_proj.codes"]["shape"] == [hidden, inter // 8]
    assert records["layers.0.mlp.down_proj.min"]["shape"] == [hidden, inter // 32]
    assert records["layers.0.mlp.down_proj.codes"]["quantization"]["format"] == "Q4_1"
    assert records["lm_head.codes"]["quantization"]["format"] == "Q8_0"
    assert any("dequantize" in k and "NT_matmul" in k for k in config["kernels"]["decode"])


def test_gpu_targets_quantize_float_weights_to_4_bits(tiny_models, tmp_path):
    """Float weights on a GPU target become q4f16_1 unless told (MLC-LLM's default), with fp16 KV."""
    folder, _, _ = tiny_models("llama")
    config = _config(compile_model(folder, tmp_path / "tiny-cuda", target="cuda", quiet=True))
    assert config["quantization"] == "q4f16_1" and config["kv_dtype"] == "float16"


def test_the_cuda_library_is_self_contained(cuda_artifact):
    """The fatbin is inside model.so, as TVM's CUDA module in fatbin format: no CUDA source is left, no file
    beside it, and plain ``tvm.runtime.load_module`` fails here only for want of a CUDA runtime."""
    import tvm

    path, _ = cuda_artifact
    library = (path / LIBRARY_NAME).read_bytes()
    assert b"__global__" not in library and b'extern "C"' not in library
    assert sorted(p.name for p in path.iterdir() if p.suffix in (".fatbin", ".cu", ".ptx")) == []
    fatbin_module = struct.pack("<Q", 6) + b"fatbin"  # the CUDA module's format field
    assert library.count(fatbin_module) == 1
    if tvm.runtime.cuda(0).exist:
        pytest.skip("this machine has a CUDA runtime: the library loads")
    with pytest.raises(RuntimeError, match="load_from_bytes.cuda"):
        tvm.runtime.load_module(str(path / LIBRARY_NAME))


def test_cuda_kernel_resources_are_recorded_and_checked(cuda_artifact):
    """ptxas's registers, shared memory and spills of every kernel are in the config; none spills and none
    exceeds the 48 KB of static shared memory (the build would have failed)."""
    path, _ = cuda_artifact
    config = _config(path)
    resources = config["resources"]["sm_89"]
    device_kernels = {f"{k}_kernel" for names in config["kernels"].values() for k in names}
    assert device_kernels <= set(resources)
    for name, k in resources.items():
        assert set(k) == {"registers", "shared_bytes", "stack_bytes", "spill_stores", "spill_loads"}, name
        assert 0 < k["registers"] <= 255 and k["spill_stores"] == k["spill_loads"] == 0, (name, k)
        assert k["shared_bytes"] <= gpu_attention.CUDA_STATIC_SHARED
    assert resources["dense_attention_gpu_kernel"]["shared_bytes"] > 0  # staged keys
    result = CliRunner().invoke(main, ["bench", "resources", str(path)])
    assert result.exit_code == 0 and "attention_scores_gpu_kernel" in result.output


def test_the_resource_check_fails_a_spilling_kernel(tmp_path):
    """A kernel squeezed to 16 registers (ptxas allots its minimum, 24) spills: ptxas's report says so and
    the check fails the build."""
    from mlc_magicdec.compile import cuda

    source = """extern "C" __global__ void heavy(float* x) {
      float a[32];
      for (int i = 0; i < 32; ++i) a[i] = x[threadIdx.x * 32 + i] * x[i];
      float s = 0.f;
      for (int i = 0; i < 32; ++i) for (int j = 0; j < 32; ++j) s += a[i] * a[j] * x[(i * j) & 1023];
      x[threadIdx.x] = s;
    }"""
    cu = tmp_path / "heavy.cu"
    cu.write_text(source)
    import subprocess

    done = subprocess.run(
        [
            "nvcc",
            "-cubin",
            "-arch=sm_89",
            "-maxrregcount=16",
            "-Xptxas",
            "-v",
            "-o",
            str(tmp_path / "h"),
            str(cu),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = cuda.parse_ptxas(done.stderr)
    assert report["heavy"]["spill_stores"] > 0 and report["heavy"]["spill_loads"] > 0
    with pytest.raises(cuda.CudaCompileError, match="spills registers on sm_89") as e:
        cuda.check_resources({"sm_89": report})
    assert "\n" not in str(e.value)
    # and the same kernel with its registers free passes
    cuda.check_resources({"sm_89": cuda.resource_usage(source, ("sm_89",))})


def test_embed_fatbin_replaces_the_cuda_source_and_nothing_else():
    """The packed modules keep their layout: only the CUDA module's format and data change."""
    import tvm
    import tvm_ffi

    from mlc_magicdec.compile import cuda

    a = te.placeholder((256,), name="a")
    b = te.compute((256,), lambda i: a[i] * 2.0, name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (loop,) = sch.get_loops(sch.get_sblock("b"))
    bx, tx = sch.split(loop, [None, 64])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    library = tvm.compile(sch.mod, target=resolve("cuda", arch="89").target).mod
    source = cuda.cuda_source(library)
    blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(library).numpy())
    fatbin = b"\x50\xed\x55\xba" + bytes(range(40))
    packed = cuda.embed_fatbin(blob, source, fatbin)
    assert struct.unpack_from("<Q", packed)[0] == len(packed) - 8
    assert source.encode() not in packed and packed.endswith(struct.pack("<Q", len(fatbin)) + fatbin)
    assert struct.pack("<Q", 6) + b"fatbin" in packed and b"main_kernel" in packed  # the function table stays
    assert (
        len(packed) - len(blob) == len(fatbin) - len(source.encode()) + 2
    )  # "fatbin" is 2 bytes over "cuda"
    with pytest.raises(cuda.CudaCompileError, match="does not hold the source"):
        cuda.embed_fatbin(blob, source + "// changed", fatbin)
