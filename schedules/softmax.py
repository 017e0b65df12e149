"""Constants of the attention kernels' online softmax, shared by the CPU and GPU kernels.

Scores are scaled by ``LOG2E / sqrt(head_dim)`` so that ``exp2`` gives ``exp`` of the scaled score; a row's
running maximum starts at ``NEG_INF`` (finite, so that ``NEG_INF - NEG_INF`` is 0, not NaN).
"""

from __future__ import annotations

import math

LOG2E = math.log2(math.e)
NEG_INF = -3.0e38
