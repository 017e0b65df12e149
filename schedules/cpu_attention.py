"""CPU (llvm) kernels for the paged KV pool: KV append and paged attention (dense and sparse views).

The kernels are written already scheduled (``tirx.is_scheduled``), the way TVM's own CPU attention kernels
are: one parallel work item per (query token, KV head), so every K/V row loaded is reused by all query heads
of the GQA group. Keys are processed in blocks of ``KEY_BLOCK`` with an online softmax, and dot products
use ``LANES``-wide partial sums so LLVM emits vector code.

The semantics (what each buffer means) are documented in ``mlc_magicdec.compile.attention``.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

KEY_BLOCK = 16  # keys scored together before one online-softmax rescale
LANES = 16  # vector width (fp32 lanes of AVX-512) used for partial dot products
LOG2E = math.log2(math.e)
NEG_INF = -3.0e38


def kv_append(num_kv_heads: int, head_dim: int, page_size: int, dtype: str):
    """``pool[layer, slot // page, 0|1, h, slot % page, :] = k|v[t, h, :]`` for every new token ``t``."""
    Hkv, D = num_kv_heads, head_dim

    @T.prim_func(s_tir=True)
    def kv_append_cpu(pool_h: T.handle, k_h: T.handle, v_h: T.handle, slot_h: T.handle, layer: T.int32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        num_layers = T.int32()
        num_pages = T.int32()
        n = T.int32()
        pool = T.match_buffer(pool_h, (num_layers, num_pages, 2, Hkv, page_size, D), dtype)
        k = T.match_buffer(k_h, (n, Hkv, D), dtype)
        v = T.match_buffer(v_h, (n, Hkv, D), dtype)
        slot = T.match_buffer(slot_h, (n,), "int32")
        for t in T.parallel(n):
            for h in T.serial(Hkv):
                for d in T.vectorized(D):
                    pool[layer, slot[t] // page_size, 0, h, slot[t] % page_size, d] = k[t, h, d]
                    pool[layer, slot[t] // page_size, 1, h, slot[t] % page_size, d] = v[t, h, d]

    return kv_append_cpu


def paged_attention(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: str, sparse: bool):
    """Attention of each query token over its sequence's keys in the paged pool.

    Dense view: keys at positions ``0 .. pos[t]``. Sparse view: the positions listed in
    ``static_pos[b, layer, h, :static_len[b]]`` followed by ``window_start[b] .. pos[t]``.
    """
    Hq, Hkv, D = num_heads, num_kv_heads, head_dim
    G = Hq // Hkv
    KB, V = KEY_BLOCK, LANES
    DV = D // V if D % V == 0 else 0
    scale = LOG2E / math.sqrt(D)

    def _load_or_zero(buf, b):
        return 0 if buf is None else buf[b]

    def _key_position(static_pos, b, layer, kh, idx, n_static, w0):
        """Position of the ``idx``-th key: first the static list, then the window ``w0 ..``."""
        if static_pos is None:
            return idx
        return T.if_then_else(idx < n_static, static_pos[b, layer, kh, idx], w0 + idx - n_static)

    @T.macro
    def body(n, q, pool, page_table, token_seq, token_pos, out, layer, static_pos, static_len, window_start):
        for th in T.parallel(n * Hkv):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                qf = T.sblock_alloc_buffer((G, D), "float32")
                acc = T.sblock_alloc_buffer((G, D), "float32")
                m = T.sblock_alloc_buffer((G,), "float32")
                den = T.sblock_alloc_buffer((G,), "float32")
                s = T.sblock_alloc_buffer((G, KB), "float32")
                part = T.sblock_alloc_buffer((V,), "float32")
                kpage = T.sblock_alloc_buffer((KB,), "int32")
                koff = T.sblock_alloc_buffer((KB,), "int32")
                mnew = T.sblock_alloc_buffer((1,), "float32")
                t: T.let[T.int32] = th // Hkv
                kh: T.let[T.int32] = th % Hkv
                b: T.let[T.int32] = token_seq[t]
                n_static: T.let[T.int32] = _load_or_zero(static_len, b)
                w0: T.let[T.int32] = _load_or_zero(window_start, b)
                n_keys: T.let[T.int32] = n_static + token_pos[t] - w0 + 1
                for g in T.serial(G):
                    m[g] = T.float32(NEG_INF)
                    den[g] = T.float32(0)
                    for d in T.vectorized(D):
                        qf[g, d] = T.Cast("float32", q[t, kh * G + g, d]) * T.float32(scale)
                        acc[g, d] = T.float32(0)
                for blk in T.serial((n_keys + KB - 1) // KB):
                    nk: T.let[T.int32] = T.min(KB, n_keys - blk * KB)
                    for j in T.serial(nk):
                        idx: T.let[T.int32] = blk * KB + j
                        pos: T.let[T.int32] = _key_position(static_pos, b, layer, kh, idx, n_static, w0)
                        kpage[j] = page_table[b, pos // page_size]
                        koff[j] = pos % page_size
                    for g in T.serial(G):
                        for j in T.serial(nk):
                            if DV > 0:
                                for lane in T.vectorized(V):
                                    part[lane] = T.float32(0)
                                for dv in T.serial(DV):
                                    for lane in T.vectorized(V):
                                        part[lane] = part[lane] + qf[g, dv * V + lane] * T.Cast(
                                            "float32", pool[layer, kpage[j], 0, kh, koff[j], dv * V + lane]
                                        )
                                s[g, j] = T.float32(0)
                                for lane in T.serial(V):
                                    s[g, j] = s[g, j] + part[lane]
                            else:
                                s[g, j] = T.float32(0)
                                for d in T.serial(D):
                                    s[g, j] = s[g, j] + qf[g, d] * T.Cast(
                                        "float32", pool[layer, kpage[j], 0, kh, koff[j], d]
                                    )
                        mnew[0] = m[g]
                        for j in T.serial(nk):
                            mnew[0] = T.max(mnew[0], s[g, j])
                        den[g] = den[g] * T.exp2(m[g] - mnew[0])
                        for d in T.vectorized(D):
                            acc[g, d] = acc[g, d] * T.exp2(m[g] - mnew[0])
                        m[g] = mnew[0]
                        for j in T.serial(nk):
                            s[g, j] = T.exp2(s[g, j] - m[g])
                            den[g] = den[g] + s[g, j]
                    for j in T.serial(nk):
                        for g in T.serial(G):
                            for d in T.vectorized(D):
                                acc[g, d] = acc[g, d] + s[g, j] * T.Cast(
                                    "float32", pool[layer, kpage[j], 1, kh, koff[j], d]
                                )
                for g in T.serial(G):
                    for d in T.vectorized(D):
                        out[t, kh * G + g, d] = T.Cast(dtype, acc[g, d] / den[g])

    if sparse:

        @T.prim_func(s_tir=True)
        def sparse_attention_cpu(
            q_h: T.handle,
            pool_h: T.handle,
            page_table_h: T.handle,
            token_seq_h: T.handle,
            token_pos_h: T.handle,
            static_pos_h: T.handle,
            static_len_h: T.handle,
            window_start_h: T.handle,
            layer: T.int32,
            out_h: T.handle,
        ):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            n = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            batch = T.int32()
            max_pages = T.int32()
            max_static = T.int32()
            q = T.match_buffer(q_h, (n, Hq, D), dtype)
            pool = T.match_buffer(pool_h, (num_layers, num_pages, 2, Hkv, page_size, D), dtype)
            page_table = T.match_buffer(page_table_h, (batch, max_pages), "int32")
            token_seq = T.match_buffer(token_seq_h, (n,), "int32")
            token_pos = T.match_buffer(token_pos_h, (n,), "int32")
            static_pos = T.match_buffer(static_pos_h, (batch, num_layers, Hkv, max_static), "int32")
            static_len = T.match_buffer(static_len_h, (batch,), "int32")
            window_start = T.match_buffer(window_start_h, (batch,), "int32")
            out = T.match_buffer(out_h, (n, Hq, D), dtype)
            body(n, q, pool, page_table, token_seq, token_pos, out, layer, static_pos, static_len, window_start)

        return sparse_attention_cpu

    @T.prim_func(s_tir=True)
    def dense_attention_cpu(
        q_h: T.handle,
        pool_h: T.handle,
        page_table_h: T.handle,
        token_seq_h: T.handle,
        token_pos_h: T.handle,
        layer: T.int32,
        out_h: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        num_layers = T.int32()
        num_pages = T.int32()
        batch = T.int32()
        max_pages = T.int32()
        q = T.match_buffer(q_h, (n, Hq, D), dtype)
        pool = T.match_buffer(pool_h, (num_layers, num_pages, 2, Hkv, page_size, D), dtype)
        page_table = T.match_buffer(page_table_h, (batch, max_pages), "int32")
        token_seq = T.match_buffer(token_seq_h, (n,), "int32")
        token_pos = T.match_buffer(token_pos_h, (n,), "int32")
        out = T.match_buffer(out_h, (n, Hq, D), dtype)
        body(n, q, pool, page_table, token_seq, token_pos, out, layer, None, None, None)

    return dense_attention_cpu
