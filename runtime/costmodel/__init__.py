"""Analytic cost model of MagicDec speculative decoding: a roofline plus the fixed costs of real GPUs.

A decode step reads the weights once for the whole batch and every sequence's KV cache, and does two FLOPs
per weight per token plus four FLOPs per KV entry per query head per token (``QK^T`` and ``PV``). With
tensor parallelism over ``n`` devices the weights, the KV cache and the FLOPs are split ``n`` ways. A step
takes ``bytes / (n * f_bw * bandwidth) + flops / (n * f_fl * peak)`` (the roofline's ``max`` of the two in
the ideal mode, at ``f = 1``) plus its fixed costs: kernel launches, the tensor-parallel all-reduces and
all-gather, and a cost per speculation round (``Hardware`` documents each term, ``steps.work_time`` adds
them). The GPU presets carry terms fitted on MagicDec's published 8xH100 measurements (``GPU_FIT``).

From the step times and an acceptance rate ``alpha`` (MagicDec, Chen et al. 2024, arXiv:2408.11049)::

    Omega(gamma, alpha) = (1 - alpha^(gamma+1)) / (1 - alpha)      expected tokens per iteration
    T_SD                = (gamma * T_D + T_V(gamma) + round_s) / Omega   time per generated token
    speedup             = T_T / T_SD
"""

from __future__ import annotations

from .fit import *  # noqa: F403
from .hardware import *  # noqa: F403
from .planning import *  # noqa: F403
from .spec import *  # noqa: F403
from .steps import *  # noqa: F403
