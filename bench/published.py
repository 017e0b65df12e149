"""MagicDec's published GPU figures against the cost model: the H100 fit, its errors, table D, the claims.

The figures (``mlc_magicdec/data/magicdec_published.json``) are the authors' own: three tables measured on
8xH100 (A-C), one of their theoretical model (D), their critical lengths and minimum acceptance rates.
``fit`` fits the GPU terms (``costmodel.GPU_TERMS``) on A-C; the presets carry the result
(``costmodel.GPU_FIT``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from ..runtime import costmodel as cm

MS = 1e-3  # the tables are in milliseconds
DATA_FILE = "magicdec_published.json"
QUANTITIES = ("T_auto", "T_draft", "T_ver", "speedup")
MAX_DEVICES = 8  # the largest tensor-parallel group searched for table D's hardware


def load() -> dict[str, Any]:
    """The published figures, as shipped with the package."""
    return json.loads(resources.files("mlc_magicdec").joinpath("data", DATA_FILE).read_text())


@dataclasses.dataclass(frozen=True)
class Setup:
    """One measured table's setting: target and draft models, the draft's KV, prompt length, hardware."""

    table: str
    target: cm.ModelSpec
    draft: cm.Draft
    budget: int
    prompt: int
    hardware: str

    @classmethod
    def of(cls, table: dict[str, Any]) -> Setup:
        compressed = table["draft_kv"] == "compressed"
        draft = cm.Draft(cm.load_model(table["draft"]), compressed=compressed)
        budget = table["budget"] if compressed else table["prompt"]
        return cls(
            table["table"], cm.load_model(table["target"]), draft, budget, table["prompt"], table["hardware"]
        )

    def works(self, batch: int, gamma: int) -> tuple[cm.StepWork, cm.StepWork, cm.StepWork]:
        """A plain step, one draft step and a verification of ``gamma`` drafts at ``batch``."""
        return (
            cm.step_work(self.target, batch, self.prompt, 1),
            cm.draft_work(self.target, batch, self.budget, self.prompt, self.draft),
            cm.step_work(self.target, batch, self.prompt, gamma + 1),
        )


def _rows(data: dict[str, Any]) -> Iterable[tuple[Setup, dict[str, Any]]]:
    for table in data["measured"]:
        setup = Setup.of(table)
        for row in table["rows"]:
            yield setup, row


def timings(data: dict[str, Any]) -> list[cm.TimedWork]:
    """Every measured time of tables A-C as work: plain steps, draft rounds, verifications, and whole rounds
    (``T_sd * acc_len`` is a round's time, per-round costs included)."""
    out = []
    for setup, row in _rows(data):
        plain, draft, verify = setup.works(row["batch"], row["gamma"])
        drafting = row["gamma"] * draft
        label = f"{setup.table} batch {row['batch']}"
        out += [
            cm.TimedWork(plain, row["t_auto_ms"] * MS, f"{label} T_auto"),
            cm.TimedWork(drafting, row["t_draft_ms"] * MS, f"{label} T_draft"),
            cm.TimedWork(verify, row["t_verify_ms"] * MS, f"{label} T_ver"),
            cm.TimedWork(
                (drafting + verify).with_round(),
                row["t_sd_ms"] * row["accepted_length"] * MS,
                f"{label} round",
            ),
        ]
    return out


def fit(data: dict[str, Any]) -> cm.Hardware:
    """The H100 preset's GPU terms fitted on tables A-C (peaks and NVLink from the spec sheet)."""
    hardware = {table["hardware"] for table in data["measured"]}
    if len(hardware) != 1:
        raise cm.CostModelError(f"the measured tables span several machines: {sorted(hardware)}")
    base = cm.parse_hardware(hardware.pop())
    return cm.fit_efficiencies(base, timings(data), f"{base.name} fitted on tables A-C")


@dataclasses.dataclass(frozen=True)
class RowError:
    """Predicted against published for one row of a table: ``quantity`` in ``QUANTITIES`` (times in ms)."""

    table: str
    batch: int
    quantity: str
    published: float
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1.0


def measured_errors(hw: cm.Hardware, data: dict[str, Any]) -> list[RowError]:
    """Tables A-C: each row's times and speedup as predicted on ``hw`` (the speedup at the row's gamma and
    published accepted length)."""
    out = []
    for setup, row in _rows(data):
        gamma = row["gamma"]
        plain, draft, verify = (cm.work_time(hw, w) for w in setup.works(row["batch"], gamma))
        t_sd = cm.t_sd(gamma, draft, verify, row["accepted_length"], hw.round_s)
        predicted = {
            "T_auto": plain / MS,
            "T_draft": gamma * draft / MS,
            "T_ver": verify / MS,
            "speedup": plain / t_sd,
        }
        published = {
            "T_auto": row["t_auto_ms"],
            "T_draft": row["t_draft_ms"],
            "T_ver": row["t_verify_ms"],
            "speedup": row["speedup"],
        }
        out += [RowError(setup.table, row["batch"], q, published[q], predicted[q]) for q in QUANTITIES]
    return out


def theory_budget(data: dict[str, Any], budgets: Sequence[int] = cm.DEFAULT_BUDGETS) -> int:
    """Table D gives no draft budget: the planner's budget whose ideal speedups reproduce it best."""
    hw = cm.parse_hardware("h100").ideal()  # memory-bound: the speedups do not depend on the machine

    def worst(budget: int) -> float:
        return max(abs(e.error) for e in theory_errors(hw, data, budget) if e.quantity == "speedup")

    return min(budgets, key=worst)


def theory_errors(hw: cm.Hardware, data: dict[str, Any], budget: int) -> list[RowError]:
    """Table D: target time and speedup (self-speculation at the table's gamma and acceptance)."""
    d = data["theory"]
    model = cm.load_model(d["model"])
    out = []
    for row in d["rows"]:
        b, g = row["batch"], row["gamma"]
        tt = cm.t_target(model, hw, b, d["prompt"]) / MS
        s = cm.speedup(model, hw, b, d["prompt"], g, d["acceptance"], budget)
        out.append(RowError("D", b, "target_time", row["target_time_ms"], tt))
        out.append(RowError("D", b, "speedup", row["speedup"], s))
    return out


def theory_hardware(data: dict[str, Any]) -> cm.Hardware:
    """The preset and device count whose ideal target times come closest to table D's (worst row)."""
    candidates = [
        hw.ideal().with_devices(n)
        for hw in cm.HARDWARE_PRESETS.values()
        if hw.link_bandwidth is not None
        for n in range(1, MAX_DEVICES + 1)
    ]
    budget = cm.DEFAULT_BUDGETS[0]  # target times do not depend on it

    def worst(hw: cm.Hardware) -> float:
        errors = theory_errors(hw, data, budget)
        return max(abs(e.error) for e in errors if e.quantity == "target_time")

    return min(candidates, key=worst)


def summary(errors: Sequence[RowError]) -> dict[str, dict[str, float]]:
    """Median and worst absolute relative error per quantity."""
    by_quantity: dict[str, list[float]] = {}
    for e in errors:
        by_quantity.setdefault(e.quantity, []).append(abs(e.error))
    return {q: {"median": statistics.median(v), "worst": max(v)} for q, v in by_quantity.items()}


def critical_lengths(
    hw: cm.Hardware, batches: Sequence[int], alpha: float, model: str = "llama-3.1-8b"
) -> dict[int, int | None]:
    """Self-speculation's critical length per batch, the best gamma and budget at each length."""
    spec = cm.load_model(model)
    return {
        b: min(
            (
                length
                for k in cm.DEFAULT_BUDGETS
                if (length := cm.critical_sequence_length(spec, hw, b, alpha, budget=k)) is not None
            ),
            default=None,
        )
        for b in batches
    }


def minimum_acceptance(
    model: cm.ModelSpec, hw: cm.Hardware, batch: int, prompt: int, budget: int, tolerance: float = 1e-4
) -> float | None:
    """The smallest acceptance rate at which self-speculation beats plain decoding (best gamma); None if no
    rate does."""

    def wins(alpha: float) -> bool:
        return max(cm.speedup(model, hw, batch, prompt, g, alpha, budget) for g in cm.DEFAULT_GAMMAS) > 1.0

    lo, hi = 0.0, 1.0
    if not wins(hi):
        return None
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


def fitted_terms(hw: cm.Hardware) -> dict[str, float]:
    """The fitted GPU terms of ``hw``, rounded as ``GPU_FIT`` stores them (3 significant digits)."""
    return {t: float(f"{getattr(hw, t):.3g}") for t in cm.GPU_TERMS}


DERIVED_PRESETS = ("a100-80gb", "h200", "rtx4090")  # spec-sheet peaks and links with the H100's fitted terms
CRITICAL_BATCHES = (16, 64, 256)
CRITICAL_PRESETS = ("8xa100-80gb", "8xh100-sxm", "rtx4090")
# The minimum acceptance rates are stated without model or hardware: both models, on the machine the
# critical length is stated for.
MINIMUM_ACCEPTANCE_MODELS = ("llama-3.1-8b", "llama-3.2-1b")
MINIMUM_ACCEPTANCE_PRESET = "8xa100-80gb"


def compare(data: dict[str, Any]) -> dict[str, Any]:
    """Everything ``bench published`` reports: the fit, the presets, errors on A-D, critical lengths,
    minimum acceptance rates and the out-of-memory row, predicted against the authors' figures."""
    fitted = fit(data)
    realistic = cm.parse_hardware("8xh100")
    measured = measured_errors(realistic, data)
    d_hw = theory_hardware(data)
    d_budget = theory_budget(data)
    theory = theory_errors(d_hw, data, d_budget)
    alpha = data["theory"]["acceptance"]
    critical = {
        name: {
            mode: critical_lengths(hw, CRITICAL_BATCHES, alpha)
            for mode, hw in (
                ("realistic", cm.parse_hardware(name)),
                ("ideal", cm.parse_hardware(name).ideal()),
            )
        }
        for name in CRITICAL_PRESETS
    }
    stated = data["minimum_acceptance"]
    minimum = {
        model: {
            mode: {
                prompt: [
                    minimum_acceptance(spec, hw, stated["batch"], int(prompt), k) for k in stated["budgets"]
                ]
                for prompt in stated["by_prompt"]
            }
            for mode, hw in both_modes(MINIMUM_ACCEPTANCE_PRESET)
        }
        for model, spec in ((m, cm.load_model(m)) for m in MINIMUM_ACCEPTANCE_MODELS)
    }
    return {
        "fitted": {"hardware": fitted.to_dict(), "terms": fitted_terms(fitted), "preset": dict(cm.GPU_FIT)},
        "presets": {name: cm.HARDWARE_PRESETS[name].to_dict() for name in ("h100-sxm", *DERIVED_PRESETS)},
        "measured": [dataclasses.asdict(e) | {"error": e.error} for e in measured],
        "measured_summary": summary(measured),
        "theory": {
            "hardware": d_hw.name,
            "budget": d_budget,
            "rows": [dataclasses.asdict(e) | {"error": e.error} for e in theory],
            "summary": summary(theory),
        },
        "critical_lengths": {"alpha": alpha, "predicted": critical, "published": data["critical_lengths"]},
        "minimum_acceptance": {
            "hardware": MINIMUM_ACCEPTANCE_PRESET,
            "batch": stated["batch"],
            "budgets": stated["budgets"],
            "predicted": minimum,
            "published": stated["by_prompt"],
        },
        "out_of_memory": out_of_memory(data),
    }


def both_modes(hardware: str) -> tuple[tuple[str, cm.Hardware], tuple[str, cm.Hardware]]:
    """``hardware``'s preset, realistic and ideal."""
    hw = cm.parse_hardware(hardware)
    return ("realistic", hw), ("ideal", hw.ideal())


def out_of_memory(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Whether the planner's memory check agrees with every row that ran and every row that did not fit."""
    out = []
    for table in data["measured"]:
        setup = Setup.of(table)
        hw = cm.parse_hardware(setup.hardware)
        ran = [row["batch"] for row in table["rows"]]
        for batch, published in [(b, True) for b in ran] + [
            (b, False) for b in table.get("out_of_memory_batches", [])
        ]:
            predicted = cm.fits(setup.target, hw, batch, setup.prompt, setup.draft, setup.budget)
            out.append({"table": setup.table, "batch": batch, "published": published, "predicted": predicted})
    return out
