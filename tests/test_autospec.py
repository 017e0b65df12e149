"""Calibration fit, acceptance estimates and the automatic speculation policy, against hand computations
and simulation (no compiled model needed)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from mlc_magicdec.bench import calibrate as cal
from mlc_magicdec.runtime import autospec as auto
from mlc_magicdec.runtime import calibration as calib
from mlc_magicdec.runtime import costmodel as cm

SMOLLM2 = cm.ModelSpec(
    cm.ModelConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        context_window=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    dtype_bytes=4,
    name="smollm2",
)
CPU = cm.Hardware("cpu", 20e9, 120e9, overhead_s=2e-3, attention_flops=40e9, overlap=False)


def design_samples(hw: cm.Hardware) -> list[cm.StepSample]:
    out = []
    for b in (1, 4, 16):
        for ctx in (1024, 8192):
            for phase, kv, tokens in (("target", ctx, 1), ("draft", 256, 1), ("verify", ctx, 5)):
                s = cm.StepSample(phase, b, kv, tokens, 1.0)
                out.append(cm.StepSample(phase, b, kv, tokens, cm.predict_sample(SMOLLM2, hw, s)))
    return out


def test_fit_recovers_the_rates_that_made_the_samples():
    hw = cm.fit_hardware(SMOLLM2, design_samples(CPU), "fit")
    assert hw.bandwidth == pytest.approx(CPU.bandwidth, rel=1e-6)
    assert hw.peak_flops == pytest.approx(CPU.peak_flops, rel=1e-6)
    assert hw.attention_rate == pytest.approx(CPU.attention_rate, rel=1e-6)
    assert hw.overhead_s == pytest.approx(CPU.overhead_s, rel=1e-6)
    assert hw.sparse_rate == pytest.approx(CPU.bandwidth, rel=1e-6)  # CPU gathers as fast as it streams
    assert not hw.overlap
    slow_gather = dataclasses.replace(CPU, sparse_bandwidth=5e9)
    assert cm.fit_hardware(SMOLLM2, design_samples(slow_gather), "fit").sparse_rate == pytest.approx(
        5e9, rel=1e-6
    )


def test_fit_of_noisy_samples_predicts_within_the_noise():
    rng = np.random.default_rng(0)
    noisy = [
        cm.StepSample(s.phase, s.batch, s.kv_len, s.tokens, s.seconds * rng.uniform(0.95, 1.05))
        for s in design_samples(CPU)
    ]
    hw = cm.fit_hardware(SMOLLM2, noisy, "fit")
    for s in design_samples(CPU):  # the noiseless truth
        assert cm.predict_sample(SMOLLM2, hw, s) == pytest.approx(s.seconds, rel=0.06)


def test_a_term_the_samples_cannot_see_gets_an_infinite_rate():
    no_attention = cm.Hardware("cpu", 20e9, 120e9, overhead_s=1e-3, overlap=False, attention_flops=math.inf)
    hw = cm.fit_hardware(SMOLLM2, design_samples(no_attention), "fit")
    assert hw.attention_rate == math.inf
    assert hw.bandwidth == pytest.approx(20e9, rel=1e-6)


def test_fit_needs_enough_positive_samples():
    with pytest.raises(cm.CostModelError, match="at least 4"):
        cm.fit_hardware(SMOLLM2, design_samples(CPU)[:3], "fit")
    bad = [cm.StepSample("target", 1, 100, 1, 0.0)] * 4
    with pytest.raises(cm.CostModelError, match="positive"):
        cm.fit_hardware(SMOLLM2, bad, "fit")


def test_additive_step_time_by_hand():
    roofline = cm.Hardware("toy", bandwidth=100.0, peak_flops=10.0, overhead_s=1.0, attention_flops=5.0)
    hw = dataclasses.replace(roofline, overlap=False)
    work = cm.StepWork(200.0, 30.0, 10.0)
    assert cm.work_time(hw, work) == pytest.approx(1.0 + 2.0 + 3.0 + 2.0)
    assert cm.work_time(roofline, work) == pytest.approx(1.0 + max(2.0, 3.0 + 2.0))


def test_calibration_round_trips_through_json(tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_MAGICDEC_HOME", str(tmp_path))
    inf_hw = cm.Hardware("c", 1e9, 1e10, overhead_s=1e-3, attention_flops=math.inf, overlap=False)
    c = calib.Calibration("k1", inf_hw, tuple(design_samples(CPU)[:4]), {256: 0.8, 1024: 0.9})
    calib.save(c)
    assert calib.load("k1") == c
    assert calib.load("missing") is None
    calib.calibration_path("k2").write_text("{not json")
    assert calib.load("k2") is None


@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("alpha", [0.3, 0.8, 0.97])
def test_alpha_from_length_inverts_omega(gamma, alpha):
    assert cal.alpha_from_length(gamma, cm.omega(gamma, alpha)) == pytest.approx(alpha, abs=1e-9)
    assert cal.alpha_from_length(gamma, gamma + 1) == 1.0


def test_prediction_errors_against_a_grid_made_by_the_model():
    """A grid whose measurements are the model's own predictions has zero error everywhere."""
    ctx, b, g, k = 4096, 8, 3, 256
    length = cm.omega(g, 0.8)
    t_ar = cm.t_target(SMOLLM2, CPU, b, ctx)
    t_d = cm.t_draft(SMOLLM2, CPU, b, k, ctx)
    t_v = {str(gg): cm.t_verify(SMOLLM2, CPU, b, ctx, gg) for gg in (1, 3)}
    cell = {
        "batch": b,
        "context": ctx,
        "T_AR": t_ar,
        "T_D": {f"snapkv/{k}": t_d},
        "T_V": t_v,
        "draft": "snapkv",
        "budget": k,
        "gamma": g,
        "accepted_length": length,
        "speedup": t_ar / cm.t_sd(g, t_d, t_v[str(g)], length),
    }
    grid = {"cells": [cell], "acceptance": {str(ctx): {"accepted_length": {f"snapkv/{k}/{g}": length}}}}
    preds = cal.prediction_errors(SMOLLM2, CPU, grid)
    assert {p.quantity for p in preds} == {"T_AR", "T_D", "T_V", "speedup"}
    assert max(abs(p.error) for p in preds) < 1e-12
    assert cal.error_summary(preds)["all"] < 1e-12
    assert cal.grid_acceptance(grid, "snapkv") == {k: pytest.approx(0.8)}


# ------------------------------------------------------------------------------------------------------
# Acceptance estimates


def test_acceptance_starts_at_the_prior_and_learns_a_geometric_rate():
    a = auto.Acceptance(auto.prior_curve, 256)
    assert a.alpha() == pytest.approx(auto.PRIOR_ALPHA)
    rng = np.random.default_rng(1)
    true_alpha, gamma = 0.55, 4
    for _ in range(400):
        accepted = 0
        while accepted < gamma and rng.random() < true_alpha:
            accepted += 1
        a.observe(accepted, gamma)
    assert a.alpha() == pytest.approx(true_alpha, abs=0.08)


def test_acceptance_without_rejections_tends_to_one_and_moves_along_the_curve():
    a = auto.Acceptance(auto.prior_curve, 256)
    for _ in range(50):
        a.observe(3, 3)
    assert a.alpha() > 0.98
    # a sequence better than average carries its rate to other budgets: its rejection rate scales as the
    # curve's does
    rejection_256 = 1 - a.alpha()
    assert 1 - a.alpha(1024) == pytest.approx(
        rejection_256 * (1 - auto.prior_curve(1024)) / (1 - auto.prior_curve(256))
    )
    b = auto.Acceptance(auto.prior_curve, 256)
    # untried budgets start at the curve: doubling the budget scales the rejection rate by the prior's
    # REJECTION_PER_DOUBLING
    assert 1 - b.alpha(512) == pytest.approx((1 - auto.PRIOR_ALPHA) * auto.REJECTION_PER_DOUBLING)
    b.budget = 512
    assert b.alpha() == pytest.approx(auto.prior_curve(512))


def draft_rounds(a: auto.Acceptance, true_alpha: float, gamma: int, rounds: int, rng) -> None:
    for _ in range(rounds):
        accepted = 0
        while accepted < gamma and rng.random() < true_alpha:
            accepted += 1
        a.observe(accepted, gamma)


def test_acceptance_is_learned_per_budget():
    """A prompt that drafts poorly at 256 and well at 1024 (far more apart than the average curve): poor
    rounds at 256 leave 1024 at the average prompt's rate, and 1024's own rounds then decide there."""
    rng = np.random.default_rng(2)
    a = auto.Acceptance(auto.prior_curve, 256)
    draft_rounds(a, 0.5, 3, 40, rng)
    assert a.alpha() == pytest.approx(0.5, abs=0.1)
    assert a.alpha(1024) == pytest.approx(auto.prior_curve(1024))  # untried: the average, not 0.5 carried
    a.budget = 1024
    draft_rounds(a, 0.97, 3, 40, rng)
    assert a.alpha() > auto.prior_curve(1024)
    assert a.alpha(256) < auto.prior_curve(256)  # its own poor rounds, still remembered (faded) ...
    draft_rounds(a, 0.97, 3, 200, rng)  # ... until they fade and the rate carried from 1024 takes over
    assert a.alpha(256) > auto.prior_curve(256)


def test_measured_curve_interpolates_and_extends_along_the_prior():
    curve = auto.measured_curve({256: 0.8, 1024: 0.9})
    assert curve(256) == 0.8 and curve(1024) == 0.9
    assert curve(512) == pytest.approx(0.85)
    assert 1 - curve(2048) == pytest.approx(0.1 * auto.REJECTION_PER_DOUBLING)
    assert 1 - curve(128) == pytest.approx(0.2 / auto.REJECTION_PER_DOUBLING)


# ------------------------------------------------------------------------------------------------------
# The policy


def policy(hw: cm.Hardware, **kw) -> auto.AutoPolicy:
    return auto.AutoPolicy(auto.StepCosts(SMOLLM2, hw), range(1, 9), (128, 256, 512, 1024), **kw)


def at_prior(n: int, budget: int = 128) -> list[auto.Acceptance]:
    return [auto.Acceptance(auto.prior_curve, budget) for _ in range(n)]


def test_the_choice_is_the_best_predicted_throughput():
    p = policy(CPU)
    contexts, acc = [8000, 6000, 7000, 8000], at_prior(4)
    mean = round(sum(contexts) / 4)
    best = max(
        (
            sum(cm.omega(g, a.alpha(k)) for a in acc)
            / (g * cm.t_draft(SMOLLM2, CPU, 4, k, mean) + cm.t_verify(SMOLLM2, CPU, 4, mean, g)),
            g,
            k,
        )
        for g in range(1, 9)
        for k in (128, 256, 512, 1024)
    )
    plain = 4 / cm.t_target(SMOLLM2, CPU, 4, mean)
    assert best[0] > auto.SPECULATE_GAIN * plain  # long contexts: speculation pays here
    choice = p.choose(contexts, acc)
    assert (choice.throughput, choice.gamma, choice.budget) == pytest.approx(best)


def test_speculation_is_off_where_it_does_not_pay_and_turns_on_as_contexts_grow():
    """Short contexts on a bandwidth-rich machine: plain. The same batch at long contexts: speculation."""
    p = policy(CPU)
    acc = at_prior(1)
    assert p.choose([300], acc).gamma == 0
    on = [ctx for ctx in range(300, 8192, 64) if p.choose([ctx], acc).gamma > 0]
    assert on and all(p.choose([ctx], acc).gamma > 0 for ctx in range(on[0] + 512, 8192, 512))
    assert p.choose([300], acc).gamma == 0  # and off again



def test_a_step_busy_with_a_prefill_chunk_drafts_more_tokens_without_giving_up_throughput():
    """In a step that also prefills a long chunk every running request waits for it, so of the settings
    that pay the one with the most tokens per step wins (longer drafts than the fastest round's); a round
    that would not pay on its own still does not speculate."""
    acc = at_prior(8)
    alone = policy(CPU).choose([8000] * 8, acc)
    step_s = 40 * cm.t_target(SMOLLM2, CPU, 8, 8000)
    busy = policy(CPU).choose([8000] * 8, acc, step_s)
    plain, *options = policy(CPU).candidates([8000] * 8, acc)
    paying = [c for c in options if c.throughput >= auto.SPECULATE_GAIN * plain.throughput]
    assert alone.gamma > 0 and alone == max(paying, key=lambda c: c.throughput)
    assert busy == max(paying, key=lambda c: c.tokens / (step_s + c.seconds))
    assert busy.tokens > alone.tokens and busy.throughput >= auto.SPECULATE_GAIN * plain.throughput
    short = at_prior(2)
    assert policy(CPU).choose([300, 300], short).gamma == 0
    assert policy(CPU).choose([300, 300], short, step_s).gamma == 0


def test_poor_acceptance_turns_speculation_off():
    """Drafts that are always rejected: the policy tries the budgets where an average prompt would draft
    well, each for a few rounds, then stops speculating for good."""
    p = policy(CPU)
    acc = at_prior(8)
    tried, gammas = [], []
    for _ in range(60):
        c = p.choose([8000] * 8, acc)
        gammas.append(c.gamma)
        if c.gamma:
            tried.append(c.budget)
            for a in acc:
                a.budget = c.budget
                a.observe(0, c.gamma)
    assert gammas[0] > 0 and len(set(tried)) > 1
    assert len(tried) < 20 and not any(gammas[len(tried) :])


def test_a_prompt_that_drafts_poorly_with_a_small_view_moves_to_a_larger_one():
    """Acceptance that rises with the budget far more steeply than the average curve (a long prompt whose
    attention is spread out): the policy leaves the small views it starts with for a larger one, where
    speculation pays, instead of giving speculation up."""
    true_alpha = {128: 0.3, 256: 0.4, 512: 0.7, 1024: 0.97}
    p, acc, rng = policy(CPU), at_prior(1), np.random.default_rng(3)
    chosen = []
    for _ in range(40):
        c = p.choose([8000], acc)
        chosen.append((c.gamma, c.budget))
        if c.gamma:
            acc[0].budget = c.budget
            draft_rounds(acc[0], true_alpha[c.budget], c.gamma, 1, rng)
    assert chosen[0][0] > 0 and chosen[0][1] < 1024
    assert all(g > 0 and k == 1024 for g, k in chosen[-10:])


def test_hysteresis_between_starting_and_stopping_speculation():
    """Where speculation is predicted only a little faster than plain decoding (between STOP_GAIN and
    SPECULATE_GAIN), a plain batch stays plain and a speculating batch keeps speculating."""
    acc = at_prior(1)

    def gain(ctx: int) -> float:
        plain, *options = policy(CPU).candidates([ctx], acc)
        return max(c.throughput for c in options) / plain.throughput

    band = [ctx for ctx in range(300, 8192, 16) if auto.STOP_GAIN < gain(ctx) < auto.SPECULATE_GAIN]
    assert band
    fresh = policy(CPU)
    assert fresh.choose([band[0]], acc).gamma == 0
    running = policy(CPU)
    assert running.choose([8000], acc).gamma > 0
    assert running.choose([band[0]], acc).gamma > 0
    below = [ctx for ctx in range(300, band[0]) if gain(ctx) < auto.STOP_GAIN]
    assert running.choose([below[-1]], acc).gamma == 0


def test_fixed_gamma_or_budget_is_respected():
    p = policy(CPU, fixed_gamma=2)
    c = p.choose([8000] * 4, at_prior(4))
    assert c.gamma in (0, 2)
    p = policy(CPU, fixed_budget=512)
    assert p.choose([8000] * 4, at_prior(4, 512)).budget == 512


def test_measured_costs_correct_the_prediction():
    """Measured steps correct their phase; phases not measured yet follow the measured ones (the machine is
    slower than calibrated for all of them) until their own steps say otherwise."""
    costs = auto.StepCosts(SMOLLM2, CPU)
    predicted = costs.target(8, 4096)
    for _ in range(40):
        costs.observe("target", costs.target(8, 4096), 2 * predicted)
    assert costs.target(8, 4096) == pytest.approx(2 * predicted, rel=1e-3)
    assert costs.verify(8, 4096, 3) == pytest.approx(2 * cm.t_verify(SMOLLM2, CPU, 8, 4096, 3), rel=1e-3)
    for _ in range(40):
        costs.observe("verify", costs.verify(8, 4096, 3), 1.5 * cm.t_verify(SMOLLM2, CPU, 8, 4096, 3))
    assert costs.verify(8, 4096, 3) == pytest.approx(1.5 * cm.t_verify(SMOLLM2, CPU, 8, 4096, 3), rel=1e-3)
    assert costs.target(8, 4096) == pytest.approx(2 * predicted, rel=1e-3)
    assert costs.correction["draft"] == pytest.approx(1.75, rel=1e-3)  # the median of the two measured


def test_one_slow_step_does_not_move_the_correction():
    """A step slowed tenfold by other load leaves the correction where the steady steps put it."""
    costs = auto.StepCosts(SMOLLM2, CPU)
    predicted = cm.t_draft(SMOLLM2, CPU, 1, 256, 8000)
    costs.observe("draft", costs.draft_step(1, 256, 8000), 10 * predicted)
    assert costs.correction["draft"] == 1.0  # the calibration's prior still outweighs it
    for _ in range(auto.COST_WINDOW):
        costs.observe("draft", costs.draft_step(1, 256, 8000), 1.2 * predicted)
    costs.observe("draft", costs.draft_step(1, 256, 8000), 10 * predicted)
    assert costs.correction["draft"] == pytest.approx(1.2)


# ------------------------------------------------------------------------------------------------------
# CLI: plan --calibrate, generate --gamma auto (tiny random model)


def test_cli_calibrate_caches_the_fit_and_generate_auto_uses_it(tiny_models, tmp_path, monkeypatch):
    import json

    from test_errors import invoke

    monkeypatch.setenv("MLC_MAGICDEC_HOME", str(tmp_path))
    artifact = tiny_models("llama")[2]
    result = invoke(
        "plan",
        "--calibrate",
        artifact,
        "--quick",
        "--threads",
        "1",
        "--batch",
        "1,4",
        "--context",
        "256",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    samples = data["calibration"]["samples"]
    assert {s["phase"] for s in samples} == set(cm.PHASES)
    design = calib.QUICK_DESIGN
    assert len(samples) == (2 + len(design.budgets)) * len(design.batches) * len(design.contexts)
    assert [(p["batch"], p["context"]) for p in data["plans"]] == [(1, 256), (4, 256)]
    cached = calib.load(data["calibration"]["key"])
    assert cached is not None and cached.hardware.name.startswith("calibrated cpu")

    result = invoke(
        "generate",
        artifact,
        "--prompt",
        "It is a truth universally acknowledged",
        "--max-new-tokens",
        "12",
        "--speculate",
        "--gamma",
        "auto",
        "--budget",
        "auto",
        "--threads",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert "auto: plain steps" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "llama-3.1-8b", "--against", "grid.json"), "go with --calibrate"),
        (("--calibrate", "ART", "--model", "llama-3.1-8b"), "leave out --model"),
        ((), "give --model"),
        (("--calibrate", "ART", "--against", "GRID"), "is not a bench grid"),
        (("--calibrate", "ART", "--against", "CELLS"), "its cells lack T_AR"),
    ],
)
def test_cli_plan_calibrate_errors(tiny_models, tmp_path, args, message):
    from test_errors import cli_error, invoke

    (tmp_path / "GRID").write_text('{"cells": []}')
    (tmp_path / "CELLS").write_text('{"cells": [{"batch": 1}], "acceptance": {}}')
    names = {"ART": str(tiny_models("llama")[2]), **{n: str(tmp_path / n) for n in ("GRID", "CELLS")}}
    args = [names.get(a, a) for a in args]
    assert message in cli_error(invoke("plan", *args))
