"""Target presets: ``--target llvm|cuda|metal|vulkan`` to a TVM target and the device the runtime uses."""

from __future__ import annotations

import dataclasses
import os

import tvm
from tvm.target import Target

from ..errors import UserError

GPU_TARGETS = ("cuda", "metal", "vulkan")
TARGETS = ("llvm", *GPU_TARGETS)


class TargetError(UserError, ValueError):
    """A target that cannot be built here; the message is one line and says what to do."""


@dataclasses.dataclass(frozen=True)
class TargetPreset:
    """A resolved target: the TVM target, the runtime device string and the default dtype."""

    kind: str
    target: Target
    device: str  # "cpu", "cuda:0", "metal:0", "vulkan:0"
    default_dtype: str

    def describe(self) -> dict:
        return {"kind": self.kind, "target": str(self.target), "device": self.device}


def host_llvm(cpu: str | None = None) -> Target:
    """An llvm target for this machine's CPU (like ``-mcpu=native``), or for ``cpu`` if given."""
    from tvm.target import codegen

    triple = codegen.llvm_get_system_triple().replace("-conda-", "-unknown-")
    mcpu = cpu or codegen.llvm_get_system_cpu()
    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise TargetError(f"LLVM does not know CPU {mcpu!r}; pass --cpu with a name such as x86-64-v3")
    return Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu, "num-cores": os.cpu_count() or 1})


def resolve(kind: str, *, cpu: str | None = None) -> TargetPreset:
    """The preset for ``kind``; raises TargetError (one line) for kinds this build cannot produce."""
    if kind == "llvm":
        return TargetPreset("llvm", host_llvm(cpu), "cpu", "float32")
    if kind in GPU_TARGETS:
        raise TargetError(
            f"--target {kind} is not available in this release yet; use --target llvm (CPU) for now"
        )
    raise TargetError(f"unknown target {kind!r}; choose one of: {', '.join(TARGETS)}")


def device_from_string(device: str) -> tvm.runtime.Device:
    """``"cpu"`` / ``"cuda:0"`` to a TVM device; raises TargetError if it is not present here."""
    kind, _, index = device.partition(":")
    dev = tvm.runtime.device(kind, int(index or 0))
    if not dev.exist:
        raise TargetError(
            f"this artifact runs on {device}, which this machine does not have; "
            f"compile it again with --target llvm to run on the CPU"
        )
    return dev
