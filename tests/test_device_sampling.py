"""The device sampling functions (``compile.sampling``) against ``runtime.sampling``'s numpy reference, built
as the library builds them, on llvm and on PoCL (the CUDA schedules run as OpenCL); and what decoding copies
to the host."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from scipy import stats
from tvm import relax

from mlc_magicdec.compile import sampling as device_sampling
from mlc_magicdec.compile.build import build_library
from mlc_magicdec.compile.targets import resolve
from mlc_magicdec.runtime import opencl
from mlc_magicdec.runtime import sampling as ref
from mlc_magicdec.runtime.engine import Engine

VOCAB = 300  # over two GPU blocks' worth of threads, not a multiple of them
POCL_MISSING = opencl.available()
needs_pocl = pytest.mark.skipif(POCL_MISSING is not None, reason=f"PoCL cannot run here: {POCL_MISSING}")
TARGETS = ["llvm", pytest.param("pocl", marks=needs_pocl)]


class Uniforms:
    """A stand-in generator whose ``random`` hands out the given uniforms, in order."""

    def __init__(self, u: np.ndarray):
        self.u, self.at = np.asarray(u, np.float64).ravel(), 0

    def random(self, size=None):
        n = int(np.prod(size)) if size is not None else 1
        out = self.u[self.at : self.at + n]
        self.at += n
        return out.reshape(size) if size is not None else float(out[0])


@pytest.fixture(scope="module", params=TARGETS)
def device(request, tmp_path_factory):
    """``(call, device)``: ``call(fn, *numpy arrays)`` runs a sampling function and returns numpy."""
    preset = resolve(request.param)
    mod = device_sampling.add_functions(tvm.IRModule(), VOCAB, preset.schedules != "llvm")
    folder = tmp_path_factory.mktemp(f"sampling-{request.param}")
    info = build_library(mod, preset, folder, f"ks{request.param}_")
    dev = tvm.opencl(0) if request.param == "pocl" else tvm.cpu()
    if "kernel_table" in info:
        opencl.register(folder / info["kernel_table"])
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / info["library"])), dev)

    def call(fn, *args):
        out = vm[fn](*(tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args))
        return tuple(t.numpy() for t in out) if fn.endswith("verify") else out.numpy()

    return call


def logits_with_ties(rng, rows: int) -> np.ndarray:
    x = rng.normal(0, 2, (rows, VOCAB)).astype(np.float32)
    x[0, [5, 17, 290]] = 9.0  # a three-way tie for the maximum
    x[1, :] = 0.0  # uniform
    return x


def test_argmax_takes_the_lowest_index_of_ties(device):
    x = logits_with_ties(np.random.default_rng(0), 6)
    top = device("argmax", x)
    assert top.dtype == np.int32 and top.tolist() == np.argmax(x, axis=-1).tolist()


def test_greedy_verify_matches_the_reference(device):
    rng = np.random.default_rng(1)
    gammas = np.array([3, 0, 2, 3])
    x = rng.normal(0, 1, (int((gammas + 1).sum()), VOCAB)).astype(np.float32)
    top = np.argmax(x, axis=-1)
    starts = np.concatenate([[0], np.cumsum(gammas + 1)]).astype(np.int32)
    tokens = top.copy()
    tokens[starts[2] + 2] += 1  # the third sequence's second draft is wrong
    tokens[starts[3] + 1] += 1  # the fourth's first
    accepted, nxt = device("greedy_verify", x, tokens.astype(np.int32), starts)
    for b, g in enumerate(gammas):
        drafts, rows = tokens[starts[b] + 1 : starts[b + 1]], top[starts[b] : starts[b + 1]]
        assert (accepted[b], nxt[b]) == ref.verify_greedy(drafts, rows) if g else (0, rows[0])


@pytest.mark.parametrize(
    "temperature, top_p",
    # 0.805: no top-p boundary at a whole number of the uniform row's tokens (see TOP_P_ATOL)
    [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 1e-6), (0.01, 0.805), (2.0, 0.999)],
)
def test_probs_match_the_reference_and_keep_the_same_tokens(device, temperature, top_p):
    x = logits_with_ties(np.random.default_rng(2), 5)
    t, p = np.full(5, temperature, np.float32), np.full(5, top_p, np.float32)
    got = device("probs", x, t, p)
    want = ref.probs_from_logits(x, t.astype(np.float64), p.astype(np.float64))
    assert [np.flatnonzero(r).tolist() for r in got] == [np.flatnonzero(r).tolist() for r in want]
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)


def test_top_p_ties_at_the_boundary_keep_the_lowest_indices(device):
    x = np.full((3, VOCAB), -100.0, np.float32)  # the rest: masses under float64 round-off of the sums
    x[0, [3, 9, 40, 200]] = 20.0  # four tokens of mass 1/4 each
    x[1, [250, 7]] = 20.0
    x[2, [1, 2, 3]] = [20.0, 19.0, 19.0]
    top_p = np.array([0.5, 0.3, 0.8], np.float32)
    got = device("probs", x, np.ones(3, np.float32), top_p)
    want = ref.probs_from_logits(x, 1.0, top_p.astype(np.float64))
    assert [np.flatnonzero(r).tolist() for r in got] == [np.flatnonzero(r).tolist() for r in want]
    assert np.flatnonzero(got[0]).tolist() == [3, 9] and np.flatnonzero(got[1]).tolist() == [7]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_sample_is_the_reference_inverse_cdf(device):
    rng = np.random.default_rng(3)
    p = ref.probs_from_logits(rng.normal(0, 2, (64, VOCAB)), 1.0, 0.9)
    p[0] = 0.0
    p[0, [0, VOCAB - 1]] = 0.5  # zero-mass tokens between two halves
    u = rng.random(64)
    u[0] = 1 - 2**-30  # rounds to 1.0 in float32: still a token with mass
    got = device("sample", p.astype(np.float32), u.astype(np.float32))
    want = ref.sample(p, Uniforms(u))
    cdf = np.cumsum(p, axis=-1)
    # equal, unless the uniform lies within float32 round-off of a cumulative mass
    near = np.abs(cdf - u[:, None]).min(axis=-1) < 1e-5
    assert (got == want)[~near].all() and p[np.arange(64), got].min() > 0


def test_rejection_verify_matches_the_reference_with_the_same_uniforms(device):
    rng = np.random.default_rng(4)
    gammas = np.array([3, 0, 1, 3, 2])
    starts = np.concatenate([[0], np.cumsum(gammas + 1)])
    n, m = int(starts[-1]), int(gammas.sum())
    p = ref.probs_from_logits(rng.normal(0, 1.5, (n, VOCAB)), 1.0, 0.95)
    q = ref.probs_from_logits(rng.normal(0, 1.5, (m, VOCAB)), 0.8, 1.0)
    q[0] = p[0]  # the draft's distribution is the target's: accepted whatever the uniform
    drafts = [ref.sample(q[s - b : s - b + g], rng) for b, (s, g) in enumerate(zip(starts, gammas))]
    tokens = np.concatenate([[7, *d] for d in drafts]).astype(np.int32)
    u_accept, u_next = rng.random(m), rng.random(len(gammas))
    u_accept[[1, 4]] = 0.999  # force rejections
    accepted, nxt = device(
        "rejection_verify",
        p.astype(np.float32),
        q.astype(np.float32),
        tokens,
        starts.astype(np.int32),
        u_accept.astype(np.float32),
        u_next.astype(np.float32),
    )
    for b, g in enumerate(gammas):
        first = starts[b] - b
        uniforms = Uniforms(np.concatenate([u_accept[first : first + g], [u_next[b]]]))
        want = ref.verify_rejection(drafts[b], q[first : first + g], p[starts[b] : starts[b + 1]], uniforms)
        assert (accepted[b], nxt[b]) == want
    assert accepted.min() < gammas.max() and accepted[0] >= 1


def test_rejection_sampling_on_the_device_keeps_the_target_distribution(device):
    """Chi-square: the next token after one draft (accepted or resampled) is distributed as p."""
    vocab_used, trials = 6, 4000
    rng = np.random.default_rng(5)
    p = np.zeros((2, VOCAB))
    p[:, :vocab_used] = rng.dirichlet(np.ones(vocab_used))
    q = np.zeros((1, VOCAB))
    q[0, :vocab_used] = rng.dirichlet(np.ones(vocab_used))
    batch = 400
    counts = np.zeros(vocab_used)
    for _ in range(trials // batch):
        drafts = rng.choice(vocab_used, size=batch, p=q[0, :vocab_used])
        tokens = np.stack([np.zeros(batch), drafts], axis=1).ravel().astype(np.int32)
        accepted, nxt = device(
            "rejection_verify",
            np.tile(p, (batch, 1)).astype(np.float32),
            np.tile(q, (batch, 1)).astype(np.float32),
            tokens,
            np.arange(0, 2 * batch + 1, 2, dtype=np.int32),
            rng.random(batch).astype(np.float32),
            rng.random(batch).astype(np.float32),
        )
        first = np.where(accepted == 1, drafts, nxt)
        counts += np.bincount(first, minlength=vocab_used)[:vocab_used]
    assert stats.chisquare(counts, p[0, :vocab_used] * counts.sum()).pvalue > 1e-3


def test_greedy_decoding_copies_only_token_ids(tiny_models):
    engine = Engine(tiny_models("llama")[2])
    prompts = [[5, 6, 7, 8] * 10, [9, 10, 11] * 12]
    engine.generate(prompts, max_new_tokens=2, stop_at_eos=False)  # warm up
    target = engine.target
    before = target.host_bytes
    steps = 6
    engine.generate(prompts, max_new_tokens=steps + 1, stop_at_eos=False)
    vocab = target.cfg.vocab_size
    # prefill: its last logits once per prompt; then each token (the first and each decode step's): an int32
    assert target.host_bytes - before == len(prompts) * (vocab * 4 + (steps + 1) * 4)
