"""One Llama-family model (Llama, Qwen2, Mistral) in ``tvm.relax.frontend.nn`` on the project's paged KV pool.

The families differ only by ``ModelConfig`` (qkv bias, tied embeddings, RoPE scaling). Float linear weights
are stored ``[in_features, out_features]`` on CPUs, which read them without a transpose, and
``[out_features, in_features]`` on GPUs (``targets.linears_out_in``).

Exported functions (all take the token embeddings of a ragged batch, ``n`` tokens over ``batch`` rows):

- ``embed(input_ids[n]) -> embeds[n, hidden]``
- ``prefill(embeds, <batch>, logit_rows[batch], pool) -> (logits[batch, vocab], pool)``: chunked, ragged
  prefill; logits only at ``logit_rows`` (each sequence's last token of the chunk).
- ``decode(embeds, <batch>, pool) -> (logits[n, vocab], pool)``: one token per sequence, the plain baseline.
- ``verify(embeds, <batch>, pool) -> (logits[n, vocab], pool)``: ``gamma + 1`` tokens per sequence.
- ``draft(embeds, <batch>, <sparse view>, pool) -> (logits[n, vocab], pool)``: the sparse view.
- ``snapkv_scores(embeds, <batch>, pool) -> (scores[layers, batch, kv_heads, positions], pool)``: SnapKV's
  observation-window scores (see ``attention.attention_scores``).

``<batch>`` is ``token_slots[n], token_seq[n], token_pos[n], page_table[batch, max_pages],
query_tiles[num_tiles, 2]`` (see ``attention``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from .attention import PAGE_SIZE, AttentionBatch, SparseView, append_kv, attention, attention_scores
from .config import ModelConfig
from .quantization import GroupFormat, dequantize, dequantize_columns
from .targets import linears_out_in

Formats = Mapping[str, GroupFormat]  # linear name ("layers.0.mlp.down_proj", "lm_head") -> its format


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies in float32, computed as Hugging Face does (with Llama-3 scaling)."""
    d = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))).astype(
        np.float32
    )
    s = cfg.rope_scaling
    if s:
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x[rows]``. The host validates every index first (token ids, logit rows); the gather still clamps
    them (TVM's "clip" mode, one min/max per row) rather than read out of bounds on a bad one."""
    return nn.op.wrap_nested(relax.op.take(x._expr, rows._expr, axis=0, mode="clip"), name="take")


def take_columns(x: Tensor, columns: Tensor) -> Tensor:
    """``x[:, columns]``, clamped as ``take_rows`` is."""
    return nn.op.wrap_nested(relax.op.take(x._expr, columns._expr, axis=1, mode="clip"), name="take")


def apply_rope(qkv: Tensor, positions: Tensor, inv_freq: Tensor, num_rotated_heads: int) -> Tensor:
    """Rotate the first ``num_rotated_heads`` heads of ``qkv[n, heads, head_dim]`` (Llama half rotation)."""

    def compute(x: te.Tensor, pos: te.Tensor, freq: te.Tensor):
        half = x.shape[2] // 2

        def f(t, h, d):
            angle = tirx.Cast("float32", pos[t]) * freq[d % half]
            partner = tirx.if_then_else(d < half, -x[t, h, d + half], x[t, h, d - half])
            rotated = x[t, h, d] * tirx.cos(angle).astype(x.dtype) + partner * tirx.sin(angle).astype(x.dtype)
            return tirx.if_then_else(h < num_rotated_heads, rotated, x[t, h, d])

        return te.compute(x.shape, f, name="rope")

    return op.tensor_expr_op(compute, "rope", args=[qkv, positions, inv_freq])


class Linear(nn.Module):
    """``y = x @ W + b``: a float ``weight`` ``[in_features, out_features]``, or with ``fmt`` the
    group-quantized ``codes``, ``scale`` (and ``min``) of ``W`` that the matmul dequantizes as it reads them;
    all transposed with ``out_in``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        fmt: GroupFormat | None = None,
        out_in: bool = False,
    ):
        self.fmt, self.out_in = fmt, out_in
        if fmt is None:
            shape = (out_features, in_features) if out_in else (in_features, out_features)
            self.weight = nn.Parameter(shape)
        else:
            for name, (shape, dtype) in fmt.param_shapes(in_features, out_features, out_in).items():
                setattr(self, name, nn.Parameter(shape, dtype))
        self.bias = nn.Parameter((out_features,)) if bias else None

    def to(self, dtype: str | None = None) -> None:
        """Float parameters follow ``dtype``; quantized ones keep their format's dtypes."""
        for param in (getattr(self, "weight", None), self.bias):
            if param is not None:
                param.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.fmt is None:
            w = self.weight
        else:
            w = dequantize(self.codes, self.scale, getattr(self, "min", None), self.fmt, x.dtype, self.out_in)
        if self.out_in:
            w = op.permute_dims(w)  # fused into the matmul: one kernel reading W along its rows
        y = op.matmul(x, w)
        return y + self.bias if self.bias is not None else y

    def columns(self, ids: Tensor, dtype: str) -> Tensor:
        """``W[:, ids].T``, ``[len(ids), in_features]`` in ``dtype``: the embedding rows of a tied lm_head."""
        if self.fmt is not None:
            min_ = getattr(self, "min", None)
            return dequantize_columns(self.codes, self.scale, min_, ids, self.fmt, dtype, self.out_in)
        rows = take_rows(self.weight, ids) if self.out_in else op.permute_dims(take_columns(self.weight, ids))
        return rows if rows.dtype == dtype else rows.astype(dtype)


class Linears:
    """Makes the model's linears by name: each in its format (``formats``) or float in the target's layout."""

    def __init__(self, formats: Formats, out_in: bool):
        self.formats, self.out_in = formats, out_in

    def __call__(self, name: str, in_features: int, out_features: int, bias: bool = False) -> Linear:
        return Linear(in_features, out_features, bias, self.formats.get(name), self.out_in)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, linear: Linears):
        self.cfg = cfg
        qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = linear(prefix + "qkv_proj", cfg.hidden_size, qkv_width, cfg.qkv_bias)
        self.o_proj = linear(prefix + "o_proj", cfg.num_heads * cfg.head_dim, cfg.hidden_size)

    def forward(self, x, pool, batch: AttentionBatch, inv_freq, layer: int, target: Target, scores=None):
        c = self.cfg
        hq, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
        n = x.shape[0]
        qkv = op.reshape(self.qkv_proj(x), (n, hq + 2 * hkv, d))
        qkv = apply_rope(qkv, batch.token_pos, inv_freq, hq + hkv)
        q, k, v = op.split(qkv, [hq, hq + hkv], axis=1)
        if scores is None:
            pool = append_kv(pool, k, v, batch, layer, target)
        else:  # a scoring pass re-reads tokens already in the pool and must not rewrite their KV
            scores.append(attention_scores(q, pool, batch, layer, hkv, target))
        out = attention(q, pool, batch, layer, hkv, target)
        return self.o_proj(op.reshape(out, (n, hq * d))), pool


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, linear: Linears):
        self.inter = cfg.intermediate_size
        self.gate_up_proj = linear(prefix + "gate_up_proj", cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = linear(prefix + "down_proj", cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, linear: Linears):
        self.self_attn = Attention(cfg, prefix + "self_attn.", linear)
        self.mlp = MLP(cfg, prefix + "mlp.", linear)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)

    def forward(self, h, pool, batch, inv_freq, layer: int, target: Target, scores=None):
        a, pool = self.self_attn(self.input_layernorm(h), pool, batch, inv_freq, layer, target, scores)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), pool


class LlamaModel(nn.Module):
    """The whole decoder. With tied embeddings the table is stored once, as ``lm_head`` (``embed`` reads its
    columns, dequantizing them if it is quantized).
    ``formats`` names the linears that are group-quantized (see ``quantization``); the rest are float."""

    def __init__(
        self,
        cfg: ModelConfig,
        target: Target,
        dtype: str = "float32",
        kv_dtype: str | None = None,
        formats: Formats | None = None,
    ):
        self.cfg, self.target, self.dtype, self.kv_dtype = cfg, target, dtype, kv_dtype or dtype
        linear = Linears(formats or {}, linears_out_in(target))
        # a tied embedding table is the lm_head's weight: stored once, read through ``Linear.columns``
        self.embed_tokens = None if cfg.tie_word_embeddings else nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, f"layers.{i}.", linear) for i in range(cfg.num_layers)]
        )
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.lm_head = linear("lm_head", cfg.hidden_size, cfg.vocab_size)

    def _hidden(self, embeds: Tensor, pool: Tensor, batch: AttentionBatch, scores: list | None = None):
        inv_freq = Tensor.from_const(rope_inv_freq(self.cfg))
        h = embeds
        for i, layer in enumerate(self.layers):
            h, pool = layer(h, pool, batch, inv_freq, i, self.target, scores)
        return h, pool

    def _logits(self, h: Tensor) -> Tensor:
        logits = self.lm_head(self.norm(h))
        return logits if logits.dtype == "float32" else logits.astype("float32")

    def embed(self, input_ids: Tensor) -> Tensor:
        if self.embed_tokens is None:
            return self.lm_head.columns(input_ids, self.dtype)
        return take_rows(self.embed_tokens.weight, input_ids)

    def prefill(self, embeds, token_slots, token_seq, token_pos, page_table, query_tiles, logit_rows, pool):
        h, pool = self._hidden(
            embeds, pool, AttentionBatch(token_slots, token_seq, token_pos, page_table, query_tiles)
        )
        return self._logits(take_rows(h, logit_rows)), pool

    def decode(self, embeds, token_slots, token_seq, token_pos, page_table, query_tiles, pool):
        h, pool = self._hidden(
            embeds, pool, AttentionBatch(token_slots, token_seq, token_pos, page_table, query_tiles)
        )
        return self._logits(h), pool

    verify = decode  # same graph; exported under its own name with the verify shapes

    def draft(
        self,
        embeds,
        token_slots,
        token_seq,
        token_pos,
        page_table,
        query_tiles,
        static_pos,
        static_len,
        window_start,
        pool,
    ):
        view = SparseView(static_pos, static_len, window_start)
        batch = AttentionBatch(token_slots, token_seq, token_pos, page_table, query_tiles, view)
        h, pool = self._hidden(embeds, pool, batch)
        return self._logits(h), pool

    def snapkv_scores(self, embeds, token_slots, token_seq, token_pos, page_table, query_tiles, pool):
        """Re-run each row's observation window (its last prompt tokens) and return, per layer, the attention
        every earlier position receives: ``[num_layers, batch, num_kv_heads, max_pages * page_size]``."""
        scores: list[Tensor] = []
        _, pool = self._hidden(
            embeds, pool, AttentionBatch(token_slots, token_seq, token_pos, page_table, query_tiles), scores
        )
        return op.concat([op.unsqueeze(s, 0) for s in scores], dim=0), pool

    def pool_shape(self) -> list:
        c = self.cfg
        return [c.num_layers, "num_pages", 2, c.num_kv_heads, PAGE_SIZE * c.head_dim]

    def get_spec(self) -> nn.spec.ModuleSpec:
        c = self.cfg
        i32 = "int32"
        packed = {"param_mode": "packed", "effect_mode": "none"}
        pool = nn.spec.Tensor(self.pool_shape(), self.kv_dtype)
        batch = {
            "embeds": nn.spec.Tensor(["n", c.hidden_size], self.dtype),
            "token_slots": nn.spec.Tensor(["n"], i32),
            "token_seq": nn.spec.Tensor(["n"], i32),
            "token_pos": nn.spec.Tensor(["n"], i32),
            "page_table": nn.spec.Tensor(["batch", "max_pages"], i32),
            "query_tiles": nn.spec.Tensor(["num_tiles", 2], i32),
        }
        view = {
            "static_pos": nn.spec.Tensor(["batch", c.num_layers, c.num_kv_heads, "max_static"], i32),
            "static_len": nn.spec.Tensor(["batch"], i32),
            "window_start": nn.spec.Tensor(["batch"], i32),
        }
        return {
            "embed": {"input_ids": nn.spec.Tensor(["n"], i32), "$": packed},
            "prefill": {**batch, "logit_rows": nn.spec.Tensor(["batch"], i32), "pool": pool, "$": packed},
            "decode": {**batch, "pool": pool, "$": packed},
            "verify": {**batch, "pool": pool, "$": packed},
            "draft": {**batch, **view, "pool": pool, "$": packed},
            "snapkv_scores": {**batch, "pool": pool, "$": packed},
        }
