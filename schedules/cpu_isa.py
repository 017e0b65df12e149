"""The CPU's vector unit, read from the llvm target's features: how wide a vector register is and how
many there are. The CPU schedules size their vectors and register tiles from it, so that one code path
fits AVX-512, AVX2 and NEON machines."""

from __future__ import annotations

import dataclasses

from tvm.target import Target, codegen

FP32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class VectorUnit:
    """``lanes`` fp32 values per vector register, ``registers`` architectural vector registers."""

    lanes: int
    registers: int

    @property
    def tile_accumulators(self) -> int:
        """Accumulator registers a matmul register tile may hold (the rest stream ``A`` and ``W``)."""
        return self.registers * 5 // 8

    @property
    def score_accumulators(self) -> int:
        """Accumulator registers for one attention row tile's scores (hides FMA latency)."""
        return self.registers * 3 // 8


# by preference: (feature, unit); the first feature the target has decides
_UNITS = (
    ("avx512f", VectorUnit(lanes=16, registers=32)),
    ("avx2", VectorUnit(lanes=8, registers=16)),
    ("avx", VectorUnit(lanes=8, registers=16)),
    ("neon", VectorUnit(lanes=4, registers=32)),
)
BASELINE = VectorUnit(lanes=4, registers=16)  # SSE2, every x86-64 CPU


def _has(feature: str, target: Target) -> bool:
    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # noqa: BLE001 - a feature this target's architecture does not name
        return False


def vector_unit(target: Target | None) -> VectorUnit:
    """The vector unit of an llvm ``target`` (``BASELINE`` when none is given or none is recognized)."""
    if target is None or target.kind.name != "llvm":
        return BASELINE
    return next((unit for feature, unit in _UNITS if _has(feature, target)), BASELINE)
