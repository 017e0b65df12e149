"""Analytic (roofline) cost model of MagicDec speculative decoding.

Every step time is ``max(bytes / bandwidth, flops / peak) + overhead``: a decode step reads the weights once
for the whole batch and every sequence's KV cache, and does two FLOPs per weight per token plus four FLOPs
per KV entry per query head per token (``QK^T`` and ``PV``). With tensor parallelism over ``n`` devices the
weights, the KV cache and the FLOPs are split ``n`` ways, so bytes and FLOPs are divided by ``n``
(communication is not modelled; put it in ``Hardware.overhead_s``).

From the step times and an acceptance rate ``alpha`` (MagicDec, Chen et al. 2024, arXiv:2408.11049)::

    Omega(gamma, alpha) = (1 - alpha^(gamma+1)) / (1 - alpha)      expected tokens per iteration
    T_SD                = (gamma * T_D + T_V(gamma)) / Omega       time per generated token
    speedup             = T_T / T_SD
"""

from __future__ import annotations

from .fit import *  # noqa: F403
from .hardware import *  # noqa: F403
from .planning import *  # noqa: F403
from .spec import *  # noqa: F403
from .steps import *  # noqa: F403
