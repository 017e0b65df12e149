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
    """One accelerator (``devices`` of them with tensor parallelism) and what a step costs on it.

    The roofline terms: ``bandwidth`` and ``peak_flops`` are one device's peak HBM bytes/s and dense
    tensor-core FLOP/s; a step achieves ``bandwidth_efficiency`` and ``flops_efficiency`` of them.
    ``attention_flops`` is the rate of the attention FLOPs when it differs from the matmuls' (a calibrated
    CPU), ``sparse_bandwidth`` that of KV gathered through a compressed view. ``overlap``: memory traffic and
    compute overlap (the roofline's ``max``); otherwise they add.

    The fixed terms, which the roofline leaves out (all zero in the ideal, paper-style analysis):

    - ``launch_s`` per kernel: ``kernels * launch_s`` per step (``ModelSpec.kernels_per_step``);
    - tensor-parallel collectives over a link of ``link_bandwidth`` bytes/s per direction and
      ``link_latency_s`` per ring hop: a ring all-reduce of ``S`` bytes over ``n`` devices costs
      ``COLLECTIVE_BASE_S + 2 (n - 1) link_latency_s + 2 (n - 1) / n * S / link_bandwidth``, an all-gather
      half the hops and bytes (``steps.collective_time``); without a link they are not modelled;
    - ``overhead_s`` per forward step (a calibrated CPU's fixed cost; launches on a GPU preset);
    - ``round_s`` per speculation round (sampling, the acceptance test, KV bookkeeping), which
      ``T_SD = (gamma T_D + T_V + round_s) / accepted_length`` adds.
    """

    name: str
    bandwidth: float  # bytes/s, one device, peak
    peak_flops: float  # FLOP/s, one device, peak
    devices: int = 1
    overhead_s: float = 0.0
    attention_flops: float | None = None  # FLOP/s of attention, one device (None: peak_flops)
    overlap: bool = True
    memory: float | None = None  # bytes of device memory, one device (None: not checked)
    sparse_bandwidth: float | None = None  # bytes/s of KV gathered through a view (None: bandwidth)
    bandwidth_efficiency: float = 1.0  # achieved fraction of bandwidth (and of sparse_bandwidth)
    flops_efficiency: float = 1.0  # achieved fraction of peak_flops (and of attention_flops)
    launch_s: float = 0.0  # seconds per kernel launch
    link_bandwidth: float | None = None  # bytes/s per direction between devices (None: not modelled)
    link_latency_s: float = 0.0  # seconds per hop of a ring collective
    round_s: float = 0.0  # seconds per speculation round, besides its draft and verify steps

    def __post_init__(self) -> None:
        rates = (self.bandwidth, self.peak_flops, self.attention_rate, self.sparse_rate, *self._efficiencies)
        fixed = (self.overhead_s, self.launch_s, self.link_latency_s, self.round_s)
        if min(rates) <= 0 or self.devices < 1 or min(fixed) < 0:
            raise CostModelError(
                f"hardware {self.name!r} needs positive rates and efficiencies, devices >= 1 and fixed "
                "costs >= 0"
            )

    @property
    def _efficiencies(self) -> tuple[float, float]:
        return self.bandwidth_efficiency, self.flops_efficiency

    @property
    def memory_rate(self) -> float:
        """Achieved bytes/s of a dense read, one device."""
        return self.bandwidth * self.bandwidth_efficiency

    @property
    def sparse_rate(self) -> float:
        """Achieved bytes/s of KV read through a compressed view, one device."""
        peak = self.bandwidth if self.sparse_bandwidth is None else self.sparse_bandwidth
        return peak * self.bandwidth_efficiency

    @property
    def matmul_rate(self) -> float:
        """Achieved FLOP/s of the matmuls, one device."""
        return self.peak_flops * self.flops_efficiency

    @property
    def attention_rate(self) -> float:
        """Achieved FLOP/s of attention, one device."""
        peak = self.peak_flops if self.attention_flops is None else self.attention_flops
        return peak * self.flops_efficiency

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which a step turns from bandwidth-bound to compute-bound."""
        return self.matmul_rate / self.memory_rate

    @property
    def is_ideal(self) -> bool:
        """Peak rates and no fixed costs: the paper-style roofline."""
        return self == self.ideal()

    def ideal(self) -> Hardware:
        """The paper-style analysis of this hardware: peak rates, overlapped, no fixed costs."""
        return dataclasses.replace(
            self,
            bandwidth_efficiency=1.0,
            flops_efficiency=1.0,
            overlap=True,
            overhead_s=0.0,
            launch_s=0.0,
            link_bandwidth=None,
            link_latency_s=0.0,
            round_s=0.0,
        )

    def with_devices(self, devices: int) -> Hardware:
        """The same device, ``devices`` of them in tensor parallel."""
        name = self.name.split("x", 1)[1] if re.match(r"^\d+x", self.name) else self.name
        return dataclasses.replace(self, name=f"{devices}x{name}" if devices > 1 else name, devices=devices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Public spec sheets; FLOP/s are dense FP16 tensor-core rates with FP32 accumulate (no 2:4 sparsity); links
# are per direction.
#  - RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (v2.1), appendix table: 1008 GB/s GDDR6X,
#    165.2 TFLOPS FP16 tensor with FP32 accumulate (330.4 with sparsity). No NVLink: PCIe 4.0 x16,
#    32 GB/s per direction.
#  - A100 80GB SXM: NVIDIA A100 datasheet: 2039 GB/s HBM2e, 312 TFLOPS FP16 tensor (624 with sparsity);
#    NVLink 3, 600 GB/s per GPU both directions together.
#  - H100 SXM: NVIDIA H100 datasheet: 3.35 TB/s HBM3, 1979 TFLOPS FP16 tensor with sparsity, so 989 dense;
#    NVLink 4, 900 GB/s both directions.
#  - H200 SXM: NVIDIA H200 datasheet: 4.8 TB/s HBM3e, same tensor cores and NVLink as H100 SXM.
#  - M2 Max (38-core GPU): Apple M2 Pro/Max press release (Jan 2023): 400 GB/s unified memory; about
#    13.6 TFLOPS (FP32 ALUs; FP16 runs at the same rate on Apple GPUs).
#  - M3 Max (40-core GPU): Apple M3 family press release (Oct 2023): 400 GB/s; about 14.2 TFLOPS.
#  Memory: 24 GB (4090), 80 GB (A100 80GB, H100 SXM), 141 GB (H200); the largest unified memory the Macs
#  are sold with, 96 GB (M2 Max) and 128 GB (M3 Max), of which macOS lends the GPU most. Macs have no link.
#
# Ring latencies are NCCL's own tuning model (src/graph/tuning.cc, ring LL protocol): a base of 6.6 us
# per collective and 0.47 us per hop over NVLink, 1.0 us over PCIe.
COLLECTIVE_BASE_S = 6.6e-6
NVLINK_HOP_S = 0.47e-6
PCIE_HOP_S = 1.0e-6

# What a GPU achieves, fitted on MagicDec's published 8xH100 measurements (tables A-C of
# mlc_magicdec/data/magicdec_published.json) by `mlc-magicdec bench published`, which prints the fit and
# its errors (bench/results/published_fit.txt); tests/test_published.py refits and checks these values.
# The fractions, the launch cost and the per-round cost are taken to be the same on every GPU preset.
GPU_FIT = {
    "bandwidth_efficiency": 0.973,
    "flops_efficiency": 0.476,
    "launch_s": 5.22e-6,
    "round_s": 0.683e-3,
}


def _gpu(name: str, bandwidth: float, tflops: float, memory: float, link: float | None, hop: float):
    """A GPU preset: spec-sheet peaks, ``GPU_FIT``'s terms, additive as they were fitted."""
    return Hardware(
        name,
        bandwidth,
        tflops * TFLOPS,
        overlap=False,
        memory=memory,
        link_bandwidth=link,
        link_latency_s=hop,
        **GPU_FIT,
    )


HARDWARE_PRESETS: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        _gpu("rtx4090", 1008 * GB, 165.2, 24 * GB, 32 * GB, PCIE_HOP_S),
        _gpu("a100-80gb", 2039 * GB, 312, 80 * GB, 300 * GB, NVLINK_HOP_S),
        _gpu("h100-sxm", 3350 * GB, 989, 80 * GB, 450 * GB, NVLINK_HOP_S),
        _gpu("h200", 4800 * GB, 989, 141 * GB, 450 * GB, NVLINK_HOP_S),
        _gpu("m2-max", 400 * GB, 13.6, 96 * GB, None, 0.0),
        _gpu("m3-max", 400 * GB, 14.2, 128 * GB, None, 0.0),
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
    if devices > 1 and hw.link_bandwidth is None:
        raise CostModelError(f"hardware {spec!r}: {hw.name} has no link between devices; drop the {devices}x")
    return hw.with_devices(devices)
