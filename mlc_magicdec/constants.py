"""What several layers share (compile, schedules, runtime, bench): the KV pool's layout, the draft kinds,
the GPU target kinds and element sizes. Importing this module does not import TVM.

The KV pool is one tensor for the whole model, ``pool[layers, pages, 2, kv_heads, PAGE_SIZE * head_dim]``
(index 0 of the third axis holds keys, 1 values), with keys stored with RoPE applied at their absolute
positions; the runtime owns the page tables.
"""

from __future__ import annotations

PAGE_SIZE = 16  # token slots per KV page (the stock TVM paged kernels also require 16)
QUERY_TILE = 16  # most tokens in one query tile of the attention op
KV_TENSORS = 2  # keys and values
DRAFT_KINDS = ("streamingllm", "snapkv")  # the compressed views a self-draft attends through
DEFAULT_DRAFT = "snapkv"  # the view used when neither the caller nor the artifact names one
GPU_TARGETS = ("cuda", "metal", "vulkan")
CPU_DEVICE = "cpu"  # the device string of an artifact that runs on the CPU's own (llvm) kernels
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
DTYPES = ("float32", "float16")  # what an artifact's activations and its KV pool can be compiled to
# how an artifact stores its linear weights: float, a group-quantization scheme, or a GGUF file's own blocks
QUANTIZATIONS = ("none", "q4f16_1", "q4f32_1", "q8f16_1", "gguf")
# serving (the loop and its command line): requests admitted at once, tokens per step, queued requests
SPECULATE_MODES = ("auto", "on", "off")  # per request: follow the policy, always draft, never draft
DEFAULT_MAX_RUNNING = 32
DEFAULT_MAX_BATCH_TOKENS = 2048
DEFAULT_MAX_WAITING = 256
