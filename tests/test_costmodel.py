"""The analytic MagicDec cost model: every formula against a hand computation, and the paper's claims.

Pure Python; no TVM, no model files.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from click.testing import CliRunner

from mlc_magicdec.cli import main
from mlc_magicdec.compile.config import ModelConfig
from mlc_magicdec.errors import UserError
from mlc_magicdec.runtime import costmodel as cm

# A toy target: vocab 10, hidden 4, intermediate 8, 2 layers, 2 heads of dim 2, 1 KV head, untied.
#   attention per layer = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden = 4 * (4 + 2 + 2) + 4 * 4 = 48
#   mlp per layer       = 3 * hidden * intermediate = 3 * 4 * 8 = 96;   norms per layer = 2 * 4 = 8
#   body                = 2 * (48 + 96 + 8) + final norm 4 = 308;       embedding = lm_head = 10 * 4 = 40
#   params = 40 + 308 + 40 = 388;  read per step = 308 + 40 (lm_head; the input table is a lookup) = 348
#   W (fp16) = 348 * 2 = 696 bytes;  KV per token = 2 * 2 layers * 1 * 2 * 2 bytes = 16
#   attention FLOPs per query per KV entry = 4 * 2 layers * 2 heads * 2 = 32
TOY = ModelConfig(
    family="llama",
    vocab_size=10,
    hidden_size=4,
    intermediate_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=2,
    context_window=4096,
)
# A toy draft: vocab 10, hidden 2, intermediate 4, 1 layer, 1 head of dim 2, 1 KV head, tied embeddings.
#   attention = 2 * (2 + 2 + 2) + 2 * 2 = 16; mlp = 3 * 2 * 4 = 24; norms = 4; final norm 2 -> body 46
#   params = 20 + 46 = 66 (tied), all read per step -> W = 132 bytes; KV per token = 2 * 1 * 1 * 2 * 2 = 8
#   attention FLOPs per entry = 4 * 1 * 1 * 2 = 8
TOY_DRAFT = ModelConfig(
    family="llama",
    vocab_size=10,
    hidden_size=2,
    intermediate_size=4,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=2,
    context_window=4096,
    tie_word_embeddings=True,
)
TOY_HW = cm.Hardware("toy", bandwidth=1000.0, peak_flops=10_000.0)  # 1000 B/s, 10 kFLOP/s
W, KV, ATT, P = 696, 16, 32, 348
LLAMA_8B = cm.load_model("llama-3.1-8b")
LLAMA_1B = cm.load_model("llama-3.2-1b")
A100X8 = cm.parse_hardware("8xA100").ideal()  # the paper-style roofline; the realistic mode: test_published


# ------------------------------------------------------------------------------------------------------
# Sizes


def test_toy_sizes():
    m = cm.ModelSpec(TOY)
    assert (m.param_count, m.step_param_count, m.weight_bytes) == (388, 348, 696)
    assert (m.kv_bytes_per_token, m.attention_flops_per_entry) == (16, 32)
    tied = cm.ModelSpec(dataclasses.replace(TOY, tie_word_embeddings=True))
    assert (tied.param_count, tied.step_param_count) == (348, 348)  # one shared table, read as lm_head
    biased = cm.ModelSpec(dataclasses.replace(TOY, qkv_bias=True))
    assert biased.param_count == 388 + 2 * (4 + 2 + 2)  # q, k, v biases in each of 2 layers
    fp32 = cm.ModelSpec(TOY, dtype_bytes=4)
    assert (fp32.weight_bytes, fp32.kv_bytes_per_token) == (348 * 4, 32)
    draft = cm.ModelSpec(TOY_DRAFT)
    assert (draft.param_count, draft.weight_bytes, draft.kv_bytes_per_token) == (66, 132, 8)


def test_llama_3_1_8b_size():
    # embedding 128256 * 4096 = 525,336,576 (and as much again for the untied lm_head);
    # each layer: q, o 4096^2; k, v 4096 * 1024; mlp 3 * 4096 * 14336; norms 2 * 4096 -> 218,112,000
    embedding = 128256 * 4096
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert LLAMA_8B.param_count == 2 * embedding + 32 * layer + 4096 == 8_030_261_248
    assert LLAMA_8B.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072  # 128 KiB per token


# ------------------------------------------------------------------------------------------------------
# Step times


def test_t_target_by_hand():
    # B=1, L=10: bytes 696 + 16 * 10 = 856 -> 0.856 s; flops 2 * 348 + 32 * 10 = 1016 -> 0.1016 s
    assert cm.t_target(TOY, TOY_HW, 1, 10) == pytest.approx(
        max((W + KV * 10) / 1000, (2 * P + ATT * 10) / 1e4)
    )
    assert cm.t_target(TOY, TOY_HW, 1, 10) == pytest.approx(0.856)
    # B=8, L=10: bytes 696 + 8 * 160 = 1976 -> 1.976 s; flops 8 * 1016 = 8128 -> 0.8128 s
    assert cm.t_target(TOY, TOY_HW, 8, 10) == pytest.approx(1.976)
    # compute-bound: peak 1000 FLOP/s -> 8.128 s
    slow = dataclasses.replace(TOY_HW, peak_flops=1000.0)
    assert cm.t_target(TOY, slow, 8, 10) == pytest.approx(8.128)
    # a fixed overhead per step is added
    assert cm.t_target(TOY, dataclasses.replace(TOY_HW, overhead_s=0.01), 8, 10) == pytest.approx(1.986)


def test_t_verify_by_hand():
    # gamma=3 verifies 4 tokens: same bytes, 4x the flops
    # B=1, L=10: max(0.856, 4 * 1016 / 1e4 = 0.4064) = 0.856 (bandwidth-bound: costs one decode step)
    assert cm.t_verify(TOY, TOY_HW, 1, 10, 3) == pytest.approx(0.856)
    # B=8, L=10: max(1.976, 4 * 8128 / 1e4 = 3.2512) = 3.2512 (compute-bound)
    assert cm.t_verify(TOY, TOY_HW, 8, 10, 3) == pytest.approx(3.2512)
    assert cm.t_verify(TOY, TOY_HW, 8, 10, 0) == pytest.approx(cm.t_target(TOY, TOY_HW, 8, 10))


def test_t_draft_by_hand():
    # self-speculation, B=8, K=4: bytes 696 + 8 * 16 * 4 = 1208 -> 1.208 s;
    # flops 8 * (2 * 348 + 32 * 4) = 6592 -> 0.6592 s
    assert cm.t_draft(TOY, TOY_HW, 8, 4) == pytest.approx(1.208)
    assert cm.t_draft(TOY, TOY_HW, 8, 4, context=10) == pytest.approx(1.208)
    assert cm.t_draft(TOY, TOY_HW, 8, 4, context=100_000) == pytest.approx(1.208)  # flat in L
    # a budget beyond the context reads the context: same as a target step
    assert cm.t_draft(TOY, TOY_HW, 8, 100, context=10) == pytest.approx(cm.t_target(TOY, TOY_HW, 8, 10))


def test_small_draft_by_hand():
    small = cm.ModelSpec(TOY_DRAFT)
    # full KV, B=8, L=10: bytes 132 + 8 * 8 * 10 = 772 -> 0.772 s; flops 8 * (132 + 8 * 10) = 1696
    full = cm.Draft(small, compressed=False)
    assert cm.t_draft(TOY, TOY_HW, 8, 4, context=10, draft=full) == pytest.approx(0.772)
    # grows with L: L=20 -> 132 + 8 * 8 * 20 = 1412 bytes
    assert cm.t_draft(TOY, TOY_HW, 8, 4, context=20, draft=full) == pytest.approx(1.412)
    # compressed, K=4: bytes 132 + 8 * 8 * 4 = 388 -> 0.388 s, whatever L
    compressed = cm.Draft(small, compressed=True)
    for context in (10, 20, 10_000):
        assert cm.t_draft(TOY, TOY_HW, 8, 4, context=context, draft=compressed) == pytest.approx(0.388)
    with pytest.raises(cm.CostModelError):
        cm.t_draft(TOY, TOY_HW, 8, 4, draft=full)  # full KV needs L


def test_tensor_parallel_halves_times():
    two = TOY_HW.with_devices(2)
    assert two.name == "2xtoy" and two.devices == 2
    for batch, context in ((1, 10), (8, 10), (8, 1000)):
        assert cm.t_target(TOY, two, batch, context) == pytest.approx(
            cm.t_target(TOY, TOY_HW, batch, context) / 2
        )
        assert cm.t_verify(TOY, two, batch, context, 3) == pytest.approx(
            cm.t_verify(TOY, TOY_HW, batch, context, 3) / 2
        )
        assert cm.t_draft(TOY, two, batch, 4, context) == pytest.approx(
            cm.t_draft(TOY, TOY_HW, batch, 4, context) / 2
        )


# ------------------------------------------------------------------------------------------------------
# Speculation arithmetic


def test_omega():
    assert cm.omega(5, 0.0) == 1.0  # only the bonus token
    assert cm.omega(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)  # 1.875
    assert cm.omega(4, 0.8) == pytest.approx((1 - 0.8**5) / (1 - 0.8))  # 3.36160
    assert cm.omega(4, 1.0) == 5.0  # the limit gamma + 1, no division by zero
    assert cm.omega(0, 0.7) == 1.0
    # continuous near 1 (the closed form loses all precision here)
    for eps in (1e-6, 1e-9, 1e-12, 1e-15):
        assert cm.omega(4, 1.0 - eps) == pytest.approx(5.0 - 10 * eps, abs=1e-9)  # d/dalpha = 0+1+2+3+4
    values = [cm.omega(6, a) for a in (0.9, 0.99, 0.999, 0.9999, 1.0)]
    assert values == sorted(values)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(cm.CostModelError):
            cm.omega(3, bad)


def test_t_sd_reproduces_measured_numbers():
    # measured: T_D = 12.0 ms, T_V = 30.0 ms, gamma = 4, mean accepted length 3.2 tokens
    # T_SD = (4 * 12.0 + 30.0) / 3.2 = 78.0 / 3.2 = 24.375 ms
    assert cm.t_sd(4, 0.012, 0.030, 3.2) == pytest.approx(0.024375, rel=1e-12)
    assert cm.t_sd(4, 0.012, 0.030, 3.2) == (4 * 0.012 + 0.030) / 3.2
    with pytest.raises(cm.CostModelError):
        cm.t_sd(4, 0.012, 0.030, 0.0)


def test_speedup_by_hand():
    # B=8, L=10, gamma=3, alpha=0.5, K=4: Omega = 1.875; T_SD = (3 * 1.208 + 3.2512) / 1.875 = 3.66677
    # speedup = T_T / T_SD = 1.976 / 3.66677 = 0.53889
    expected = 1.976 / ((3 * 1.208 + 3.2512) / 1.875)
    assert cm.speedup(TOY, TOY_HW, 8, 10, 3, 0.5, 4) == pytest.approx(expected)
    assert expected == pytest.approx(0.538893, rel=1e-5)


def test_critical_length_is_the_smallest_winning_length():
    for batch in (1, 16, 256):
        length = cm.critical_sequence_length(LLAMA_8B, A100X8, batch, 0.85, budget=256)
        assert length is not None
        best = [
            cm.speedup(LLAMA_8B, A100X8, batch, n, g, 0.85, 256)
            for n in (length - 1, length)
            for g in cm.DEFAULT_GAMMAS
        ]
        assert max(best[len(cm.DEFAULT_GAMMAS) :]) > 1.0 >= max(best[: len(cm.DEFAULT_GAMMAS)])
    # a fixed gamma; and never, when drafting is useless (alpha 0: one token per gamma + 1 steps)
    assert cm.critical_sequence_length(LLAMA_8B, A100X8, 64, 0.85, gamma=3, budget=256) is not None
    assert cm.critical_sequence_length(LLAMA_8B, A100X8, 64, 0.0, budget=256) is None
    assert cm.critical_sequence_length(LLAMA_8B, A100X8, 1, 0.85, budget=256, max_length=1024) is None


# ------------------------------------------------------------------------------------------------------
# The paper's claims, in direction


def test_critical_length_falls_as_flops_per_byte_rise():
    bandwidth = 2039 * cm.GB
    lengths = [
        cm.critical_sequence_length(LLAMA_8B, cm.Hardware(f"{t}T", bandwidth, t * cm.TFLOPS, 8), 256, 0.85)
        for t in (100, 312, 1000)
    ]
    assert None not in lengths
    assert lengths[0] > lengths[1] > lengths[2]


def test_speedup_grows_with_batch_past_the_critical_length():
    batches = (1, 16, 64, 256)
    context = 65536
    for b in batches:
        assert cm.critical_sequence_length(LLAMA_8B, A100X8, b, 0.9, budget=256) < context
    speedups = [cm.best_plan(LLAMA_8B, A100X8, b, context, 0.9, [256]).speedup for b in batches]
    assert speedups == sorted(speedups) and speedups[-1] > 2 * speedups[0]


def test_small_draft_with_full_kv_scales_worse_with_batch():
    batches = (1, 16, 64, 256)

    def curve(compressed: bool) -> list[float]:
        draft = cm.Draft(LLAMA_1B, compressed)
        return [
            cm.best_plan(
                LLAMA_8B, A100X8, b, 32768, 0.8, [512], draft=draft, with_critical_length=False
            ).speedup
            for b in batches
        ]

    full, compressed = curve(False), curve(True)
    assert all(c > f for c, f in zip(compressed, full))  # compressed gains more at every batch size
    assert compressed[-1] / compressed[0] > full[-1] / full[0]
    assert full[-1] <= full[0]  # full KV: no gain from batching
    assert compressed == sorted(compressed)


# ------------------------------------------------------------------------------------------------------
# Planning, acceptance curves, parsing


def test_best_plan_picks_the_best_setting():
    curve = {256: 0.7, 512: 0.85, 1024: 0.9}
    plan = cm.best_plan(LLAMA_8B, A100X8, 64, 32768, curve, gammas=(1, 2, 3, 4))
    grid = {
        (k, g): cm.speedup(LLAMA_8B, A100X8, 64, 32768, g, a, k)
        for k, a in curve.items()
        for g in (1, 2, 3, 4)
    }
    assert (plan.budget, plan.gamma) == max(grid, key=grid.get)
    assert plan.speedup == pytest.approx(max(grid.values()))
    assert plan.alpha == curve[plan.budget]
    assert plan.speedups[plan.gamma] == pytest.approx(plan.speedup)
    assert plan.t_target == cm.t_target(LLAMA_8B, A100X8, 64, 32768)
    assert plan.t_draft == cm.t_draft(LLAMA_8B, A100X8, 64, plan.budget, 32768)
    assert plan.t_verify[2] == cm.t_verify(LLAMA_8B, A100X8, 64, 32768, 2)
    assert plan.critical_length == cm.critical_sequence_length(
        LLAMA_8B, A100X8, 64, plan.alpha, budget=plan.budget, gammas=(1, 2, 3, 4)
    )
    json.dumps(plan.to_dict())
    # a callable curve works the same
    assert cm.best_plan(LLAMA_8B, A100X8, 64, 32768, curve.get, curve, (1, 2, 3, 4)) == plan


def test_acceptance_curve_interpolates_in_log_budget():
    alpha_at = cm.acceptance_curve({256: 0.8, 1024: 0.9})
    assert alpha_at(256) == 0.8 and alpha_at(1024) == 0.9
    assert alpha_at(512) == pytest.approx(0.85)  # halfway in log2: 8 -> 9 -> 10
    with pytest.raises(cm.CostModelError, match="outside"):
        alpha_at(2048)


def test_parse_alpha():
    assert cm.parse_alpha("0.85") == 0.85
    assert cm.parse_alpha("256:0.8, 512:0.85,1024:0.9") == {256: 0.8, 512: 0.85, 1024: 0.9}
    for bad in ("x", "1.5", "256:0.8:1", "256:1.2", "abc:0.8", ""):
        with pytest.raises(UserError) as e:
            cm.parse_alpha(bad)
        assert "\n" not in str(e.value)


def test_parse_hardware():
    assert cm.parse_hardware("rtx4090") == cm.HARDWARE_PRESETS["rtx4090"]
    a100 = cm.parse_hardware("8xA100")
    assert (a100.name, a100.devices, a100.bandwidth, a100.peak_flops) == ("8xa100-80gb", 8, 2039e9, 312e12)
    assert cm.parse_hardware("8xh100").peak_flops == 989e12
    assert cm.parse_hardware("H200").bandwidth == 4800e9
    assert cm.parse_hardware("M2-Max").devices == 1
    for bad in ("tpu", "0xa100", "8x"):
        with pytest.raises(UserError):
            cm.parse_hardware(bad)


def test_load_model_forms(tmp_path):
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 4,
        "intermediate_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    }
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    for spec in (tmp_path / "hf", tmp_path / "hf" / "config.json"):
        m = cm.load_model(str(spec))
        assert (m.config, m.dtype_bytes) == (TOY, 4)
    assert cm.load_model(str(tmp_path / "hf"), dtype="float16").dtype_bytes == 2
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / cm.ARTIFACT_CONFIG_NAME).write_text(
        json.dumps({"model": TOY.to_dict(), "dtype": "float16"})
    )
    m = cm.load_model(str(tmp_path / "art"))
    assert (m.config, m.dtype_bytes, m.name) == (TOY, 2, "art")
    for spec in (str(tmp_path / "nothing"), "llama-9"):
        with pytest.raises(UserError):
            cm.load_model(spec)


# ------------------------------------------------------------------------------------------------------
# CLI


def _plan(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


@pytest.mark.parametrize("ideal", [True, False])
def test_cli_plan_json(ideal):
    args = ["--model", "llama-3.1-8b", "--hardware", "8xA100", "--batch", "1,64,256"]
    args += ["--context", "1024,32768,131072", "--alpha", "0.9", "--json"]
    result = _plan(*args, *(["--ideal"] if ideal else []))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mode"].startswith("ideal" if ideal else "realistic")
    assert data["model"]["params"] == LLAMA_8B.param_count
    assert data["hardware"]["devices"] == 8
    hw = A100X8 if ideal else cm.parse_hardware("8xA100")
    plans = data["plans"]
    assert [(p["batch"], p["context"]) for p in plans] == [
        (b, c) for b in (1, 64, 256) for c in (1024, 32768, 131072)
    ]
    for p in plans:
        expected = cm.best_plan(LLAMA_8B, hw, p["batch"], p["context"], 0.9)
        assert p["speedup"] == pytest.approx(expected.speedup)
        assert (p["gamma"], p["budget"], p["critical_length"]) == (
            expected.gamma,
            expected.budget,
            expected.critical_length,
        )
        assert set(p["speedups"]) == {"1", "2", "3", "4", "5", "6"}
    at = {(p["batch"], p["context"]): p["speedup"] for p in plans}
    assert at[(256, 32768)] > at[(64, 32768)] > at[(1, 32768)]


def test_cli_plan_table_and_plot(tmp_path):
    png = tmp_path / "speedup.png"
    result = _plan(
        "--model",
        "llama-3.1-8b",
        "--hardware",
        "rtx4090",
        "--batch",
        "1,8",
        "--context",
        "4096,32768",
        "--alpha",
        "256:0.8,512:0.85,1024:0.9",
        "--plot",
        str(png),
        "--json",
        str(tmp_path / "plan.json"),
    )
    assert result.exit_code == 0, result.output
    assert "rtx4090" in result.stdout and "critical L" in result.stdout
    assert png.stat().st_size > 0
    # --json FILE keeps the tables and writes the JSON that --json alone prints, from the same run
    args = ["--model", "llama-3.1-8b", "--hardware", "rtx4090", "--batch", "1,8", "--context", "4096,32768"]
    printed = _plan(*args, "--alpha", "256:0.8,512:0.85,1024:0.9", "--json")
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(printed.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "speedup.png"]  # no temporary file


@pytest.mark.parametrize(
    "args, message",
    [
        (("--hardware", "tpu-v9"), "unknown hardware"),
        (("--alpha", "0.9:x"), "bad --alpha"),
        (("--alpha", "1.5"), "acceptance rate"),
        (("--model", "/no/such/model"), "no model"),
        (("--budget", "4096", "--alpha", "256:0.8,1024:0.9"), "outside"),
        (("--json", "/no/such/folder/plan.json"), "does not exist"),
    ],
)
def test_cli_plan_errors_are_one_line(args, message):
    base = {"--model": "llama-3.1-8b", "--hardware": "8xA100", "--alpha": "0.9"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    result = _plan(*[x for kv in base.items() for x in kv])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_omega_matches_closed_form_away_from_one():
    for gamma in range(8):
        for alpha in (0.1, 0.5, 0.9):
            assert cm.omega(gamma, alpha) == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))
    assert math.isclose(cm.omega(3, 0.5), 1.875)


def test_memory_check_by_hand():
    """Llama-3.1-8B fp16: 16.06 GB of weights; KV 128 KiB a token. A 4090 (24 GB) holds 8k tokens of one
    sequence but not 64 sequences of 1k; eight A100s hold 256 sequences of 4k (16.06 + 137.4 GB)."""
    kv = 2 * 32 * 8 * 128 * 2
    assert cm.memory_needed(LLAMA_8B, 3, 1000) == LLAMA_8B.param_count * 2 + 3 * 1000 * kv
    rtx = cm.parse_hardware("rtx4090")
    assert cm.fits(LLAMA_8B, rtx, 1, 8192) is True
    assert cm.fits(LLAMA_8B, rtx, 64, 1024) is False
    assert cm.fits(LLAMA_8B, cm.parse_hardware("8xa100"), 256, 4096) is True
    assert cm.fits(LLAMA_8B, cm.parse_hardware("8xa100"), 256, 131072) is False
    assert cm.fits(LLAMA_8B, cm.Hardware("no spec", 1e12, 1e14), 256, 131072) is None
    plan = cm.best_plan(LLAMA_8B, rtx, 64, 1024, 0.85, with_critical_length=False)
    assert plan.fits is False and plan.to_dict()["fits"] is False


def test_cpu_hardware_is_measured_here(monkeypatch):
    from mlc_magicdec.bench import roofline

    measured = roofline.Machine(bandwidth_best=25e9, bandwidth_median=20e9, matmul_flops=120e9, threads=2)
    monkeypatch.setattr(roofline, "measure", lambda threads: measured)
    hw = cm.parse_hardware("CPU", roofline.this_cpu)
    assert (hw.name, hw.bandwidth, hw.peak_flops, hw.devices) == ("cpu", 20e9, 120e9, 1)
    assert hw.memory > 1e9  # this machine's RAM
    # a step of SmolLM2-sized weights at 20 GB/s, by hand
    spec = cm.ModelSpec(TOY, 4)
    assert cm.t_target(spec, hw, 1, 10) == pytest.approx(
        max((spec.weight_bytes + 10 * spec.kv_bytes_per_token) / 20e9,
            (2 * spec.step_param_count + spec.attention_flops_per_entry * 10) / 120e9))
