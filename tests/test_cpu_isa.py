"""The CPU schedules size vectors and register tiles from the target's features, not from this machine."""

from __future__ import annotations

import pytest
from tvm.target import Target

from mlc_magicdec.compile.targets import host_llvm
from mlc_magicdec.schedules import attention_kernels, cpu
from mlc_magicdec.schedules.cpu_isa import BASELINE, vector_unit


@pytest.mark.parametrize("mcpu, triple, lanes, registers", [
    ("haswell", "x86_64-pc-linux-gnu", 8, 16),
    ("skylake-avx512", "x86_64-pc-linux-gnu", 16, 32),
    ("x86-64", "x86_64-pc-linux-gnu", 4, 16),
    ("cortex-a72", "aarch64-linux-gnu", 4, 32),
])
def test_vector_unit_follows_the_target(mcpu, triple, lanes, registers):
    unit = vector_unit(Target({"kind": "llvm", "mcpu": mcpu, "mtriple": triple}))
    assert (unit.lanes, unit.registers) == (lanes, registers)


def test_avx2_register_tiles_fit_sixteen_registers():
    haswell = vector_unit(host_llvm("haswell"))
    avx512 = vector_unit(host_llvm("skylake-avx512"))
    assert haswell.lanes == 8 and avx512.lanes == 16
    for unit in (haswell, avx512):
        cols, _ = cpu._column_blocking(576, 2, unit)
        assert cols % unit.lanes == 0
        assert cpu.ROWS * cols // unit.lanes <= unit.tile_accumulators < unit.registers
    assert dict(attention_kernels(host_llvm("haswell")).sizing) == {"score_accumulators": 6}
    assert vector_unit(None) == BASELINE
