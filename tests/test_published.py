"""The cost model on real GPUs: its fixed-cost terms by hand, and MagicDec's published figures reproduced.

The oracle is the authors' own data (``mlc_magicdec/data/magicdec_published.json``): tables A-C measured on
8xH100 and table D of their theory. Pure Python; no TVM, no model files.
"""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
from click.testing import CliRunner
from test_costmodel import TOY

from mlc_magicdec.bench import published
from mlc_magicdec.cli import main
from mlc_magicdec.runtime import autospec
from mlc_magicdec.runtime import calibration as calib
from mlc_magicdec.runtime import costmodel as cm

DATA = published.load()
LLAMA_8B = cm.load_model("llama-3.1-8b")
H100X8 = cm.parse_hardware("8xh100")
A100X8 = cm.parse_hardware("8xa100")
# Toy GPU pair: 1000 B/s, 10 kFLOP/s, 10 ms a kernel, a 100 B/s link with 1 ms a hop, 0.5 s a round.
TOY_PAIR = cm.Hardware(
    "toy", 1000.0, 1e4, devices=2, launch_s=0.01, link_bandwidth=100.0, link_latency_s=1e-3, round_s=0.5
)


# ------------------------------------------------------------------------------------------------------
# The terms, by hand


def test_fixed_costs_by_hand():
    # TOY, batch 1, L=10, two devices: roofline max(856 B / 2 / 1000, 1016 FLOP / 2 / 1e4) = 0.428 s.
    # kernels 12 * 2 layers + 4 = 28 -> 0.28 s. Four all-reduces (2 a layer) of 1 token * 4 hidden * 2 B:
    # latency 4 * (6.6 us + 2 * 1 hop * 1 ms); one all-gather of 10 logits * 2 B: 6.6 us + 1 ms; over the
    # link 1/2 * (2 * 4 * 8 + 20) = 42 B -> 0.42 s.
    m = cm.ModelSpec(TOY)
    assert (m.kernels_per_step, m.allreduces_per_step) == (28, 4)
    collectives = 4 * (6.6e-6 + 2e-3) + (6.6e-6 + 1e-3) + 0.42
    assert cm.t_target(TOY, TOY_PAIR, 1, 10) == pytest.approx(0.428 + 0.28 + collectives)
    assert cm.t_target(TOY, TOY_PAIR.ideal(), 1, 10) == pytest.approx(0.428)
    # one device: no collectives, and the whole roofline on it
    one = TOY_PAIR.with_devices(1)
    assert cm.t_target(TOY, one, 1, 10) == pytest.approx(0.856 + 0.28)
    # achieved fractions scale the rates; additive without overlap
    slow = dataclasses.replace(one, bandwidth_efficiency=0.5, flops_efficiency=0.25, overlap=False)
    assert cm.t_target(TOY, slow, 1, 10) == pytest.approx(0.856 / 0.5 + 0.1016 / 0.25 + 0.28)
    # a round pays round_s once: T_SD = (gamma T_D + T_V + round) / accepted length
    assert cm.t_sd(3, 1.0, 2.0, 2.5, TOY_PAIR.round_s) == pytest.approx((3 + 2 + 0.5) / 2.5)
    t_t, t_d, t_v = (
        cm.t_target(TOY, one, 1, 10),
        cm.t_draft(TOY, one, 1, 4, 10),
        cm.t_verify(TOY, one, 1, 10, 3),
    )
    expected = t_t / ((3 * t_d + t_v + 0.5) / cm.omega(3, 0.5))
    assert cm.speedup(TOY, one, 1, 10, 3, 0.5, 4) == pytest.approx(expected)


def test_ideal_is_the_paper_roofline():
    for name in cm.HARDWARE_PRESETS:
        hw = cm.parse_hardware(name)
        ideal = hw.ideal()
        assert not hw.is_ideal and ideal.is_ideal
        assert (ideal.bandwidth, ideal.peak_flops) == (hw.bandwidth, hw.peak_flops)
        # the ideal step: max(bytes / bandwidth, flops / peak) at the spec sheet's peaks
        w = cm.step_work(LLAMA_8B, 64, 8192, 1)
        assert cm.work_time(ideal, w) == pytest.approx(
            max(w.nbytes / hw.bandwidth, (w.matmul_flops + w.attention_flops) / hw.peak_flops)
        )
        assert cm.work_time(hw, w) > cm.work_time(ideal, w)


def test_presets_share_the_fitted_terms_and_keep_their_spec_sheets():
    for name, (bandwidth, link) in {
        "h100-sxm": (3350e9, 450e9),
        "a100-80gb": (2039e9, 300e9),
        "h200": (4800e9, 450e9),
        "rtx4090": (1008e9, 32e9),
    }.items():
        hw = cm.HARDWARE_PRESETS[name]
        assert (hw.bandwidth, hw.link_bandwidth) == (bandwidth, link)
        assert {t: getattr(hw, t) for t in cm.GPU_TERMS} == cm.GPU_FIT
    assert cm.HARDWARE_PRESETS["rtx4090"].link_latency_s > cm.HARDWARE_PRESETS["h100-sxm"].link_latency_s
    with pytest.raises(cm.CostModelError, match="no link"):
        cm.parse_hardware("2xm2-max")


def test_the_fit_recovers_known_terms():
    truth = dataclasses.replace(
        H100X8, bandwidth_efficiency=0.8, flops_efficiency=0.6, launch_s=4e-6, round_s=1e-3
    )
    timed = [dataclasses.replace(t, seconds=cm.work_time(truth, t.work)) for t in published.timings(DATA)]
    fitted = cm.fit_efficiencies(H100X8, timed)
    for term in cm.GPU_TERMS:
        assert getattr(fitted, term) == pytest.approx(getattr(truth, term), rel=1e-6)


# ------------------------------------------------------------------------------------------------------
# MagicDec's figures


def test_the_presets_carry_the_fit_of_tables_a_to_c():
    assert published.fitted_terms(published.fit(DATA)) == cm.GPU_FIT


def test_every_row_of_tables_a_to_c_within_25_percent():
    errors = published.measured_errors(H100X8, DATA)
    assert len(errors) == 4 * 15 and {e.quantity for e in errors} == set(published.QUANTITIES)
    worst = max(errors, key=lambda e: abs(e.error))
    assert abs(worst.error) < 0.25, worst
    # the medians are far tighter
    assert all(s["median"] < 0.06 for s in published.summary(errors).values())
    # the ideal roofline is not: it misses the fixed costs that dominate these steps
    ideal = published.measured_errors(H100X8.ideal(), DATA)
    assert max(abs(e.error) for e in ideal if e.quantity == "T_draft") > 0.5


def test_table_d_in_the_ideal_mode_within_10_percent():
    hw = published.theory_hardware(DATA)
    assert hw.is_ideal and hw.name == "6xa100-80gb"
    budget = published.theory_budget(DATA)
    assert budget == 2048
    errors = published.theory_errors(hw, DATA, budget)
    assert all(abs(e.error) < 0.10 for e in errors), errors
    # speedups at the table's gammas do not depend on the machine where every step is bandwidth-bound
    other = published.theory_errors(cm.parse_hardware("4xh100").ideal(), DATA, budget)
    assert [e.predicted for e in other if e.quantity == "speedup"] == pytest.approx(
        [e.predicted for e in errors if e.quantity == "speedup"], rel=1e-3
    )


def test_critical_lengths_beside_the_authors():
    real_a100 = published.critical_lengths(A100X8, (256,), 0.833)[256]
    real_h100 = published.critical_lengths(H100X8, (256,), 0.833)[256]
    ideal_a100 = published.critical_lengths(A100X8.ideal(), (256,), 0.833)[256]
    assert abs(real_a100 / 3300 - 1) < 0.25  # "about 3,300 tokens at batch 256 on 8xA100"
    assert abs(real_a100 / 4000 - 1) < 0.25  # "about 4,000 for Llama-3.1-8B"
    assert real_h100 < real_a100  # "lower on H100s"
    assert ideal_a100 < real_a100 / 3  # the roofline alone is far too optimistic


def test_the_memory_check_agrees_with_every_row():
    rows = published.out_of_memory(DATA)
    assert any(not r["published"] for r in rows)  # table A at batch 480
    assert all(r["predicted"] == r["published"] for r in rows), rows


# ------------------------------------------------------------------------------------------------------
# The claims, in direction, in the realistic mode


def test_critical_length_falls_as_flops_per_byte_rise():
    lengths = [
        cm.critical_sequence_length(
            LLAMA_8B, dataclasses.replace(A100X8, peak_flops=t * cm.TFLOPS), 256, 0.85
        )
        for t in (150, 312, 1000)
    ]
    assert None not in lengths
    assert lengths[0] > lengths[1] > lengths[2]
    assert A100X8.ridge < H100X8.ridge


def test_past_the_critical_length_speedup_grows_with_batch():
    context = 32768
    batches = (16, 64, 256)
    for b in batches:
        assert cm.critical_sequence_length(LLAMA_8B, A100X8, b, 0.85) < context
    speedups = [
        cm.best_plan(LLAMA_8B, A100X8, b, context, 0.85, with_critical_length=False).speedup for b in batches
    ]
    assert speedups == sorted(speedups) and speedups[-1] > 1.5 * speedups[0]


def _speedups(table: str) -> dict[int, float]:
    errors = published.measured_errors(H100X8, DATA)
    return {e.batch: e.predicted for e in errors if e.table == table and e.quantity == "speedup"}


def test_full_kv_draft_stops_scaling_while_a_compressed_one_keeps_scaling():
    full, compressed = _speedups("A"), _speedups("B")
    assert compressed[256] / compressed[16] > 1.15 > full[256] / full[16]
    assert all(compressed[b] > full[b] for b in full if b > 16)
    # the reason: a full-KV draft step grows with batch as the KV it reads does
    a = published.Setup.of(DATA["measured"][0])
    b = published.Setup.of(DATA["measured"][1])
    growth = {
        s.table: cm.work_time(H100X8, s.works(256, 2)[1]) / cm.work_time(H100X8, s.works(16, 2)[1])
        for s in (a, b)
    }
    assert growth["A"] > 1.5 * growth["B"]  # published: 9.78 / 3.52 = 2.8x against 1.5x per step


def test_at_a_short_prompt_speculation_stops_paying_as_batch_grows():
    c = _speedups("C")
    assert c[32] > 1.0 > c[512]
    batches = sorted(b for b in c if b >= 32)
    assert [c[b] for b in batches] == sorted((c[b] for b in batches), reverse=True)


# ------------------------------------------------------------------------------------------------------
# The runtime keeps its own calibration; the command


def test_auto_fits_its_terms_on_the_device_not_the_preset(monkeypatch):
    """gamma='auto' plans with the rates fitted to steps timed on its device: steps shaped like a GPU's
    (launch-bound, one device) fit to a per-step overhead and achieved rates that predict them."""
    gpu = cm.parse_hardware("rtx4090")
    samples = [
        cm.StepSample(
            phase, b, kv, tokens, cm.work_time(gpu, cm.step_work(LLAMA_8B, b, kv, tokens, phase == "draft"))
        )
        for b in (1, 4, 16)
        for phase, kv, tokens in (
            ("target", 4096, 1),
            ("target", 16384, 1),
            ("verify", 4096, 4),
            ("draft", 256, 1),
        )
    ]
    fitted = cm.fit_hardware(LLAMA_8B, samples, "calibrated cuda")
    assert fitted.overhead_s == pytest.approx(LLAMA_8B.kernels_per_step * gpu.launch_s, rel=0.05)
    for s in samples:
        assert cm.predict_sample(LLAMA_8B, fitted, s) == pytest.approx(s.seconds, rel=0.02)
    monkeypatch.setattr(
        calib, "load_or_calibrate", lambda engine: calib.Calibration("k", fitted, tuple(samples))
    )
    engine = types.SimpleNamespace(config=LLAMA_8B.config, artifact=types.SimpleNamespace(spec=LLAMA_8B))
    policy = autospec.AutoPolicy.calibrated(engine, cm.SELF_DRAFT, (1, 2), (256,))
    assert policy.costs.hardware == fitted


def test_bench_published_prints_and_writes_the_comparison(tmp_path):
    out = tmp_path / "published.json"
    result = CliRunner().invoke(main, ["bench", "published", "--json", str(out)])
    assert result.exit_code == 0, result.output
    for title in ("Tables A-C", "Table D", "Critical sequence length", "median / worst"):
        assert title in result.stdout
    report = json.loads(out.read_text())
    assert report["fitted"]["terms"] == cm.GPU_FIT
    assert report["theory"]["hardware"] == "6xa100-80gb"
