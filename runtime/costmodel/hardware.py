"""Hardware presets and the parser of ``--hardware``; the units and defaults the cost model shares."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from ...errors import UserError

HF_CONFIG_NAME = "config.json"
DEFAULT_DTYPE = "float16"
GB = 1e9
TFLOPS = 1e12
FLOPS_PER_MAC = 2  # a multiply-accumulate is two FLOPs
ATTENTION_FLOPS_PER_ENTRY = 2 * FLOPS_PER_MAC  # per query head and KV entry: one MAC in QK^T, one in PV
DEFAULT_GAMMAS = (1, 2, 3, 4, 5, 6)
DEFAULT_BUDGETS = (256, 512, 1024, 2048)
DEFAULT_MAX_LENGTH = 1 << 20  # search cap of the critical length when the model gives no context window


class CostModelError(UserError, ValueError):
    """Bad input to the cost model (unknown hardware, bad acceptance rate, ...); the message is one line."""


# ------------------------------------------------------------------------------------------------------
# Hardware


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator (``devices`` of them with tensor parallelism): per-device HBM bandwidth and peak.

    ``peak_flops`` is the dense (non-sparse) tensor-core rate of the dtype used; ``overhead_s`` is a fixed
    cost per forward step (kernel launches, synchronisation, all-reduces), not divided among devices.
    ``attention_flops`` is the rate of the attention FLOPs when it differs from ``peak_flops`` (a calibrated
    machine whose attention kernel runs at another rate than its matmuls). ``overlap``: memory traffic and
    compute overlap (the roofline's ``max``); a calibrated CPU adds them instead. ``sparse_bandwidth`` is
    the rate of KV reads through a draft's compressed view (a gather of scattered positions), when it
    differs from ``bandwidth``.
    """

    name: str
    bandwidth: float  # bytes/s, one device
    peak_flops: float  # FLOP/s, one device
    devices: int = 1
    overhead_s: float = 0.0
    attention_flops: float | None = None  # FLOP/s of attention, one device (None: peak_flops)
    overlap: bool = True
    memory: float | None = None  # bytes of device memory, one device (None: not checked)
    sparse_bandwidth: float | None = (
        None  # bytes/s of KV gathered through a compressed view (None: bandwidth)
    )

    def __post_init__(self) -> None:
        rates = (self.bandwidth, self.peak_flops, self.attention_rate, self.sparse_rate)
        if min(rates) <= 0 or self.devices < 1 or self.overhead_s < 0:
            raise CostModelError(
                f"hardware {self.name!r} needs positive bandwidth and FLOP/s, devices >= 1 and overhead >= 0"
            )

    @property
    def sparse_rate(self) -> float:
        """Bytes/s of KV read through a compressed view, one device."""
        return self.bandwidth if self.sparse_bandwidth is None else self.sparse_bandwidth

    @property
    def attention_rate(self) -> float:
        """FLOP/s of attention, one device."""
        return self.peak_flops if self.attention_flops is None else self.attention_flops

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which a step turns from bandwidth-bound to compute-bound."""
        return self.peak_flops / self.bandwidth

    def with_devices(self, devices: int) -> Hardware:
        """The same device, ``devices`` of them in tensor parallel."""
        name = self.name.split("x", 1)[1] if re.match(r"^\d+x", self.name) else self.name
        return dataclasses.replace(self, name=f"{devices}x{name}" if devices > 1 else name, devices=devices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Public spec sheets; FLOP/s are dense FP16 tensor-core rates with FP32 accumulate (no 2:4 sparsity).
#  - RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (v2.1), appendix table: 1008 GB/s GDDR6X,
#    165.2 TFLOPS FP16 tensor with FP32 accumulate (330.4 with sparsity).
#  - A100 80GB SXM: NVIDIA A100 datasheet: 2039 GB/s HBM2e, 312 TFLOPS FP16 tensor (624 with sparsity).
#  - H100 SXM: NVIDIA H100 datasheet: 3.35 TB/s HBM3, 1979 TFLOPS FP16 tensor with sparsity, so 989 dense.
#  - H200 SXM: NVIDIA H200 datasheet: 4.8 TB/s HBM3e, same tensor cores as H100 SXM (989 dense).
#  - M2 Max (38-core GPU): Apple M2 Pro/Max press release (Jan 2023): 400 GB/s unified memory; about
#    13.6 TFLOPS (FP32 ALUs; FP16 runs at the same rate on Apple GPUs).
#  - M3 Max (40-core GPU): Apple M3 family press release (Oct 2023): 400 GB/s; about 14.2 TFLOPS.
#  Memory: 24 GB (4090), 80 GB (A100 80GB, H100 SXM), 141 GB (H200); the largest unified memory the Macs
#  are sold with, 96 GB (M2 Max) and 128 GB (M3 Max), of which macOS lends the GPU most.
HARDWARE_PRESETS: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware("rtx4090", 1008 * GB, 165.2 * TFLOPS, memory=24 * GB),
        Hardware("a100-80gb", 2039 * GB, 312 * TFLOPS, memory=80 * GB),
        Hardware("h100-sxm", 3350 * GB, 989 * TFLOPS, memory=80 * GB),
        Hardware("h200", 4800 * GB, 989 * TFLOPS, memory=141 * GB),
        Hardware("m2-max", 400 * GB, 13.6 * TFLOPS, memory=96 * GB),
        Hardware("m3-max", 400 * GB, 14.2 * TFLOPS, memory=128 * GB),
    )
}
HARDWARE_ALIASES = {
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
    "a100": "a100-80gb",
    "a100-80g": "a100-80gb",
    "h100": "h100-sxm",
    "h200-sxm": "h200",
    "m2max": "m2-max",
    "m3max": "m3-max",
}
_TP_PREFIX = re.compile(r"^(\d+)\s*[x*]\s*(.+)$")


MEASURED_CPU = "cpu"


def parse_hardware(spec: str, measure_cpu: Callable[[], Hardware] | None = None) -> Hardware:
    """``"rtx4090"``, ``"8xA100"``, ``"8xh100"``: a preset (case-insensitive), ``Nx`` = N devices in TP;
    ``"cpu"``: this machine's CPU, measured on the spot by ``measure_cpu`` (``bench.roofline.this_cpu``)."""
    text = spec.strip().lower().replace("_", "-").replace(" ", "")
    if text == MEASURED_CPU:
        if measure_cpu is None:
            raise CostModelError(f"hardware {spec!r} is measured on the spot: use `mlc-magicdec plan`")
        return measure_cpu()
    devices = 1
    m = _TP_PREFIX.match(text)
    if m:
        devices, text = int(m.group(1)), m.group(2)
        if devices < 1:
            raise CostModelError(f"hardware {spec!r}: the device count must be at least 1")
    hw = HARDWARE_PRESETS.get(HARDWARE_ALIASES.get(text, text))
    if hw is None:
        raise CostModelError(
            f"unknown hardware {spec!r}; choose from {', '.join(HARDWARE_PRESETS)} (prefix Nx for N devices) "
            f"or {MEASURED_CPU} (measured here)"
        )
    return hw.with_devices(devices)
