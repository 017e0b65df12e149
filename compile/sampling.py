"""Sampling on the device: argmax, temperature/top-p probabilities, inverse-CDF sampling, verification.

The numpy reference is ``runtime.sampling``; these functions compute the same in float32, so only token ids,
accepted counts (and, from the host, seeded uniforms) cross between host and device. Exported Relax functions
(``V`` the vocabulary; ``starts[b + 1]`` the first row of each sequence in a verify batch of ``n`` rows, whose
``tokens[n]`` are each sequence's pending token then its drafts; ``m = n - b`` drafts in all):

- ``argmax(logits[n, V]) -> tokens[n]`` (ties: lowest index);
- ``greedy_verify(logits[n, V], tokens[n], starts[b + 1]) -> (accepted[b], next[b])``;
- ``probs(logits[n, V], temperature[n], top_p[n]) -> probs[n, V]``: one-hot at the argmax where the
  temperature is 0, else softmax(logits / T) kept to its top-p set and renormalized;
- ``sample(probs[n, V], u[n]) -> tokens[n]``: the first token whose cumulative mass exceeds ``u * total``;
- ``rejection_verify(p[n, V], q[m, V], tokens[n], starts[b + 1], u_accept[m], u_next[b])
  -> (accepted[b], next[b])``: accept draft ``x`` while ``u * q(x) < p(x)``, then sample the next token from
  ``max(p - q, 0)`` at the first rejection (from ``p`` if that holds under ``MIN_RESIDUAL_MASS``) or from the
  bonus row. ``q`` holds each sequence's drafts in order, sequence after sequence (``u_accept`` likewise).

Top-p without a sort: the kept set's smallest probability ``v`` is found by bisection on the float32 bit
pattern (the largest ``v`` whose mass of ``p >= v`` reaches ``top_p``), and of the tokens tied at ``v`` the
lowest-index ones are kept, as the reference's stable sort does. Differences from the float64 reference:
a kept-set boundary within ``TOP_P_ATOL`` of ``top_p``, a uniform within float32 round-off of a cumulative
mass or of an acceptance ratio, and residual masses under ``MIN_RESIDUAL_MASS`` (the reference: 1e-12).

One kernel body per function serves both kinds of target: on GPUs one block of ``GPU_THREADS`` threads per
row (or sequence), which stride over the vocabulary and merge through shared memory; on CPUs rows run in
parallel with one "thread" each, the same code with the barriers left out.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

GPU_THREADS = 128  # threads per block on GPUs (one block per row)
FLOAT32_LOWEST = -3.4028234663852886e38
ONE_BITS = 0x3F800000  # float32 1.0 as int32: every probability's bit pattern is at most this
BISECT_STEPS = 30  # 2**30 > ONE_BITS + 1: bisection over the bit patterns of [0, 1] ends on one value
TOP_P_ATOL = 1e-6  # float32 counterpart of the reference's slack when the kept mass meets top_p exactly
MIN_RESIDUAL_MASS = 1e-6  # float32 counterpart of the reference's 1e-12 (see module docstring)
FUNCTIONS = ("argmax", "greedy_verify", "probs", "sample", "rejection_verify")


def kernels(vocab: int, gpu: bool) -> dict[str, tirx.PrimFunc]:
    """The sampling kernels for a vocabulary of ``vocab`` tokens, for a GPU or a CPU target.

    On GPUs, TVM's barrier planner rejects shared-memory loads in ``if`` conditions, so every condition reads
    a thread's local copies (``lf``, ``li``) of the shared values (``res``, ``res_i``).
    """
    V = vocab
    TH = GPU_THREADS if gpu else 1
    shared = "shared" if gpu else "global"
    local = "local" if gpu else "global"
    C = (V + TH - 1) // TH  # each thread's contiguous chunk, where the order of tokens matters

    def rows(n):
        return T.thread_binding(n, thread="blockIdx.x") if gpu else T.parallel(n)

    def threads():
        return T.thread_binding(TH, thread="threadIdx.x") if gpu else T.serial(TH)

    @T.macro
    def sync():
        if gpu:
            T.tvm_storage_sync("shared")

    @T.macro
    def row_argmax(x, r, tx, part, part_i, res, res_i, lf, li):
        """``res_i[0]``, ``res[0]`` and ``lf[0]``: the index (lowest of ties) and value of row ``r``'s largest
        logit."""
        lf[0] = T.float32(FLOAT32_LOWEST)
        li[0] = 0
        for it in T.serial(T.ceildiv(V, TH)):
            if it * TH + tx < V:
                if x[r, it * TH + tx] > lf[0]:
                    lf[0] = x[r, it * TH + tx]
                    li[0] = it * TH + tx
        part[tx] = lf[0]
        part_i[tx] = li[0]
        sync()
        if tx == 0:
            for i in T.serial(1, TH):
                lf[1] = part[i]
                li[1] = part_i[i]
                if lf[1] > lf[0] or (lf[1] == lf[0] and li[1] < li[0]):
                    lf[0] = lf[1]
                    li[0] = li[1]
            res[0] = lf[0]
            res_i[0] = li[0]
        sync()
        lf[0] = res[0]

    @T.macro
    def fold_sum(part, res, k, tx, acc):
        """``res[k]``: the sum of every thread's ``part`` (added up in the local ``acc[0]``)."""
        sync()
        if tx == 0:
            acc[0] = T.float32(0)
            for i in T.serial(TH):
                acc[0] = acc[0] + part[i]
            res[k] = acc[0]
        sync()

    @T.macro
    def pick(p, pr, q, qr, use_q, u, tx, part2, res_i, lf, li):
        """``res_i[0]``: the token drawn by inverse CDF from ``max(p[pr] - q[qr], 0)`` (``use_q``; from
        ``p[pr]`` if it is 0 or that mass is under ``MIN_RESIDUAL_MASS``) with the uniform ``u``."""
        lf[0] = T.float32(0)
        lf[1] = T.float32(0)
        for j in T.serial(C):
            if tx * C + j < V:
                lf[0] = lf[0] + T.max(
                    p[pr, tx * C + j] - T.if_then_else(use_q > 0, q[qr, tx * C + j], T.float32(0)),
                    T.float32(0),
                )
                lf[1] = lf[1] + p[pr, tx * C + j]
        part2[tx, 0] = lf[0]
        part2[tx, 1] = lf[1]
        sync()
        if tx == 0:
            li[0] = use_q  # whether q is subtracted (then column 0 of part2 holds the masses, else column 1)
            lf[0] = T.float32(0)  # the total mass
            for i in T.serial(TH):
                lf[0] = lf[0] + part2[i, 0]
            if use_q > 0 and lf[0] <= T.float32(MIN_RESIDUAL_MASS):
                li[0] = 0
                lf[0] = T.float32(0)
                for i in T.serial(TH):
                    lf[0] = lf[0] + part2[i, 1]
            lf[1] = u * lf[0]  # the mass to exceed
            lf[2] = T.float32(0)  # the mass before the current chunk, then token
            li[1] = -1  # the chunk that exceeds it
            li[2] = 0  # the last chunk (then token) with positive mass: the fallback under round-off
            for i in T.serial(TH):
                lf[3] = part2[i, 1 - li[0]]
                if lf[3] > T.float32(0):
                    li[2] = i
                if li[1] < 0:
                    if lf[2] + lf[3] > lf[1]:
                        li[1] = i
                    else:
                        lf[2] = lf[2] + lf[3]
            if li[1] < 0:
                li[1] = li[2]
            li[2] = li[1] * C
            li[3] = -1  # the token
            for j in T.serial(C):
                if li[1] * C + j < V:
                    lf[3] = T.max(
                        p[pr, li[1] * C + j] - T.if_then_else(li[0] > 0, q[qr, li[1] * C + j], T.float32(0)),
                        T.float32(0),
                    )
                    if lf[3] > T.float32(0):
                        li[2] = li[1] * C + j
                    if li[3] < 0 and lf[2] + lf[3] > lf[1]:
                        li[3] = li[1] * C + j
                    lf[2] = lf[2] + lf[3]
            if li[3] < 0:
                li[3] = li[2]
            res_i[0] = li[3]
        sync()

    @T.prim_func(s_tir=True)
    def argmax(x_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        x = T.match_buffer(x_h, (n, V), "float32")
        out = T.match_buffer(out_h, (n,), "int32")
        for r in rows(n):
            for tx in threads():
                with T.sblock("argmax"):
                    T.reads()
                    T.writes()
                    part = T.sblock_alloc_buffer((TH,), "float32", scope=shared)
                    part_i = T.sblock_alloc_buffer((TH,), "int32", scope=shared)
                    res = T.sblock_alloc_buffer((1,), "float32", scope=shared)
                    res_i = T.sblock_alloc_buffer((1,), "int32", scope=shared)
                    lf = T.sblock_alloc_buffer((2,), "float32", scope=local)
                    li = T.sblock_alloc_buffer((2,), "int32", scope=local)
                    row_argmax(x, r, tx, part, part_i, res, res_i, lf, li)
                    if tx == 0:
                        out[r] = res_i[0]

    @T.prim_func(s_tir=True)
    def greedy_accept(
        top_h: T.handle, tokens_h: T.handle, starts_h: T.handle, acc_h: T.handle, nxt_h: T.handle
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        b1 = T.int32()
        top = T.match_buffer(top_h, (n,), "int32")
        tokens = T.match_buffer(tokens_h, (n,), "int32")
        starts = T.match_buffer(starts_h, (b1,), "int32")
        accepted = T.match_buffer(acc_h, (b1 - 1,), "int32")
        nxt = T.match_buffer(nxt_h, (b1 - 1,), "int32")
        for s in rows(b1 - 1):
            for tx in threads():
                with T.sblock("greedy_accept"):
                    T.reads()
                    T.writes()
                    li = T.sblock_alloc_buffer((1,), "int32", scope=local)
                    if tx == 0:
                        li[0] = 0
                        for i in T.serial(starts[s + 1] - starts[s] - 1):
                            if li[0] == i and tokens[starts[s] + 1 + i] == top[starts[s] + i]:
                                li[0] = i + 1
                        accepted[s] = li[0]
                        nxt[s] = top[starts[s] + li[0]]

    @T.prim_func(s_tir=True)
    def probs(x_h: T.handle, temp_h: T.handle, top_p_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        x = T.match_buffer(x_h, (n, V), "float32")
        temperature = T.match_buffer(temp_h, (n,), "float32")
        top_p = T.match_buffer(top_p_h, (n,), "float32")
        out = T.match_buffer(out_h, (n, V), "float32")
        for r in rows(n):
            for tx in threads():
                with T.sblock("probs"):
                    T.reads()
                    T.writes()
                    part = T.sblock_alloc_buffer((TH,), "float32", scope=shared)
                    part_i = T.sblock_alloc_buffer((TH,), "int32", scope=shared)
                    # res: [largest logit, softmax sum, a mass that the threads add up]
                    res = T.sblock_alloc_buffer((3,), "float32", scope=shared)
                    # res_i: [argmax, the last kept index of a tied token]
                    res_i = T.sblock_alloc_buffer((2,), "int32", scope=shared)
                    lf = T.sblock_alloc_buffer((3,), "float32", scope=local)
                    li = T.sblock_alloc_buffer((6,), "int32", scope=local)
                    acc = T.sblock_alloc_buffer((1,), "float32", scope=local)
                    greedy: T.let[T.bool] = temperature[r] == T.float32(0)
                    temp: T.let[T.float32] = T.Select(greedy, T.float32(1), temperature[r])
                    # the mass the kept set must reach, with slack for round-off (never all of top_p)
                    reach: T.let[T.float32] = top_p[r] - T.min(
                        T.float32(TOP_P_ATOL), top_p[r] * T.float32(0.5)
                    )
                    row_argmax(x, r, tx, part, part_i, res, res_i, lf, li)
                    lf[1] = T.float32(0)
                    for it in T.serial(T.ceildiv(V, TH)):
                        if it * TH + tx < V:
                            out[r, it * TH + tx] = T.exp((x[r, it * TH + tx] - lf[0]) / temp)
                            lf[1] = lf[1] + out[r, it * TH + tx]
                    part[tx] = lf[1]
                    fold_sum(part, res, 1, tx, acc)
                    lf[1] = res[1]
                    for it in T.serial(T.ceildiv(V, TH)):
                        if it * TH + tx < V:
                            out[r, it * TH + tx] = out[r, it * TH + tx] / lf[1]
                    # The top-p threshold: each thread bisects its own copy of the bounds (li[1], li[2]).
                    # Barriers may not sit under a condition, not even a loop's extent: every row takes the
                    # bisection's steps, and those that keep every token skip their work.
                    li[1] = 0
                    li[2] = ONE_BITS + 1
                    for _step in T.serial(BISECT_STEPS):
                        lf[0] = T.reinterpret("float32", (li[1] + li[2]) // 2)
                        lf[1] = T.float32(0)
                        for it in T.serial(T.Select(greedy or top_p[r] >= T.float32(1), 0, T.ceildiv(V, TH))):
                            if it * TH + tx < V:
                                if out[r, it * TH + tx] >= lf[0]:
                                    lf[1] = lf[1] + out[r, it * TH + tx]
                        part[tx] = lf[1]
                        fold_sum(part, res, 2, tx, acc)
                        lf[1] = res[2]
                        if not greedy and top_p[r] < T.float32(1):
                            if lf[1] >= reach:
                                li[1] = (li[1] + li[2]) // 2
                            else:
                                li[2] = (li[1] + li[2]) // 2
                    # the threshold v: the mass above it and the tokens tied at it
                    lf[0] = T.reinterpret("float32", li[1])
                    lf[1] = T.float32(0)
                    li[5] = 0
                    for it in T.serial(T.ceildiv(V, TH)):
                        if it * TH + tx < V:
                            if out[r, it * TH + tx] > lf[0]:
                                lf[1] = lf[1] + out[r, it * TH + tx]
                            elif out[r, it * TH + tx] == lf[0]:
                                li[5] = li[5] + 1
                    part[tx] = lf[1]
                    part_i[tx] = li[5]
                    fold_sum(part, res, 2, tx, acc)
                    li[2] = 0  # tokens tied at v
                    for i in T.serial(TH):
                        li[2] = li[2] + part_i[i]
                    lf[1] = res[2]
                    lf[2] = T.float32(1)  # the kept mass
                    li[3] = V - 1  # the last kept index of a tied token
                    li[4] = li[2]  # tied tokens kept
                    if li[1] > 0:
                        # the fewest tied tokens that reach top_p, lowest indices first
                        li[4] = T.max(
                            1,
                            T.min(
                                li[2],
                                T.Cast("int32", T.ceil((reach - lf[1]) / lf[0])),
                            ),
                        )
                        lf[2] = lf[1] + T.Cast("float32", li[4]) * lf[0]
                    if tx == 0:
                        if li[4] < li[2]:
                            li[5] = 0
                            for v in T.serial(V):
                                if out[r, v] == lf[0]:
                                    li[5] = li[5] + 1
                                    if li[5] == li[4]:
                                        li[3] = v
                        res_i[1] = li[3]
                    sync()
                    li[0] = res_i[0]
                    li[3] = res_i[1]
                    for it in T.serial(T.ceildiv(V, TH)):
                        if it * TH + tx < V:
                            if greedy:
                                out[r, it * TH + tx] = T.Select(
                                    it * TH + tx == li[0], T.float32(1), T.float32(0)
                                )
                            elif out[r, it * TH + tx] > lf[0] or (
                                out[r, it * TH + tx] == lf[0] and it * TH + tx <= li[3]
                            ):
                                out[r, it * TH + tx] = out[r, it * TH + tx] / lf[2]
                            else:
                                out[r, it * TH + tx] = T.float32(0)

    @T.prim_func(s_tir=True)
    def sample(p_h: T.handle, u_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        p = T.match_buffer(p_h, (n, V), "float32")
        u = T.match_buffer(u_h, (n,), "float32")
        out = T.match_buffer(out_h, (n,), "int32")
        for r in rows(n):
            for tx in threads():
                with T.sblock("sample"):
                    T.reads()
                    T.writes()
                    part2 = T.sblock_alloc_buffer((TH, 2), "float32", scope=shared)
                    res_i = T.sblock_alloc_buffer((1,), "int32", scope=shared)
                    lf = T.sblock_alloc_buffer((4,), "float32", scope=local)
                    li = T.sblock_alloc_buffer((4,), "int32", scope=local)
                    pick(p, r, p, r, 0, u[r], tx, part2, res_i, lf, li)
                    if tx == 0:
                        out[r] = res_i[0]

    @T.prim_func(s_tir=True)
    def rejection_verify(
        p_h: T.handle,
        q_h: T.handle,
        tokens_h: T.handle,
        starts_h: T.handle,
        u_accept_h: T.handle,
        u_next_h: T.handle,
        acc_h: T.handle,
        nxt_h: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        m = T.int32()
        b1 = T.int32()
        p = T.match_buffer(p_h, (n, V), "float32")
        q = T.match_buffer(q_h, (m, V), "float32")
        tokens = T.match_buffer(tokens_h, (n,), "int32")
        starts = T.match_buffer(starts_h, (b1,), "int32")
        u_accept = T.match_buffer(u_accept_h, (m,), "float32")
        u_next = T.match_buffer(u_next_h, (b1 - 1,), "float32")
        accepted = T.match_buffer(acc_h, (b1 - 1,), "int32")
        nxt = T.match_buffer(nxt_h, (b1 - 1,), "int32")
        for s in rows(b1 - 1):
            for tx in threads():
                with T.sblock("rejection_verify"):
                    T.reads()
                    T.writes()
                    part2 = T.sblock_alloc_buffer((TH, 2), "float32", scope=shared)
                    res_i = T.sblock_alloc_buffer((2,), "int32", scope=shared)
                    lf = T.sblock_alloc_buffer((4,), "float32", scope=local)
                    li = T.sblock_alloc_buffer((5,), "int32", scope=local)  # li[4]: drafts accepted
                    drafts: T.let[T.int32] = starts[s + 1] - starts[s] - 1
                    first: T.let[T.int32] = starts[s] - s  # this sequence's first row of q
                    if tx == 0:
                        li[4] = 0
                        for i in T.serial(drafts):
                            if (
                                li[4] == i
                                and u_accept[first + i] * q[first + i, tokens[starts[s] + 1 + i]]
                                < p[starts[s] + i, tokens[starts[s] + 1 + i]]
                            ):
                                li[4] = i + 1
                        res_i[1] = li[4]
                    sync()
                    li[4] = res_i[1]
                    pick(
                        p,
                        starts[s] + li[4],
                        q,
                        first + T.min(li[4], drafts - 1),
                        T.Select(li[4] < drafts, 1, 0),
                        u_next[s],
                        tx,
                        part2,
                        res_i,
                        lf,
                        li,
                    )
                    if tx == 0:
                        accepted[s] = li[4]
                        nxt[s] = res_i[0]

    return {
        "argmax": argmax,
        "greedy_accept": greedy_accept,
        "probs": probs,
        "sample": sample,
        "rejection_verify": rejection_verify,
    }


def add_functions(mod: tvm.IRModule, vocab: int, gpu: bool) -> tvm.IRModule:
    """``mod`` with the sampling functions of the module docstring added (kernels for a GPU or a CPU)."""
    k = kernels(vocab, gpu)
    bb = relax.BlockBuilder(mod)
    gv = {
        name: bb.add_func(func.with_attr("global_symbol", f"{name}_kernel"), f"{name}_kernel")
        for name, func in k.items()
    }
    n, m, b1 = (tirx.Var(name, "int64") for name in ("n", "m", "b1"))
    b = b1 - 1

    def tensor(name, shape, dtype="float32"):
        return relax.Var(name, relax.TensorType(shape, dtype))

    def out(shape, dtype="int32"):
        return relax.TensorType(shape, dtype)

    logits, tokens, starts = (
        tensor("logits", [n, vocab]),
        tensor("tokens", [n], "int32"),
        tensor("starts", [b1], "int32"),
    )
    with bb.function("argmax", [logits]):
        with bb.dataflow():
            result = bb.emit_output(relax.call_tir(gv["argmax"], [logits], out([n])))
        bb.emit_func_output(result)

    logits, tokens, starts = (
        tensor("logits", [n, vocab]),
        tensor("tokens", [n], "int32"),
        tensor("starts", [b1], "int32"),
    )
    with bb.function("greedy_verify", [logits, tokens, starts]):
        with bb.dataflow():
            top = bb.emit(relax.call_tir(gv["argmax"], [logits], out([n])))
            result = bb.emit_output(
                relax.call_tir(gv["greedy_accept"], [top, tokens, starts], [out([b]), out([b])])
            )
        bb.emit_func_output(result)

    logits = tensor("logits", [n, vocab])
    temperature, top_p = tensor("temperature", [n]), tensor("top_p", [n])
    with bb.function("probs", [logits, temperature, top_p]):
        with bb.dataflow():
            result = bb.emit_output(
                relax.call_tir(gv["probs"], [logits, temperature, top_p], out([n, vocab], "float32"))
            )
        bb.emit_func_output(result)

    p, u = tensor("probs", [n, vocab]), tensor("u", [n])
    with bb.function("sample", [p, u]):
        with bb.dataflow():
            result = bb.emit_output(relax.call_tir(gv["sample"], [p, u], out([n])))
        bb.emit_func_output(result)

    p, q = tensor("p", [n, vocab]), tensor("q", [m, vocab])
    tokens, starts = tensor("tokens", [n], "int32"), tensor("starts", [b1], "int32")
    u_accept, u_next = tensor("u_accept", [m]), tensor("u_next", [b])
    with bb.function("rejection_verify", [p, q, tokens, starts, u_accept, u_next]):
        with bb.dataflow():
            result = bb.emit_output(
                relax.call_tir(
                    gv["rejection_verify"], [p, q, tokens, starts, u_accept, u_next], [out([b]), out([b])]
                )
            )
        bb.emit_func_output(result)
    return bb.get()
