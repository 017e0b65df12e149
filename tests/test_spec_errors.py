"""Bad speculative-decoding settings: each is refused with a one-line ``RequestError`` (a ``UserError``),
before anything is generated, and the prefilled batch stays usable."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_CONTEXT, TINY_VOCAB

from mlc_magicdec.errors import UserError
from mlc_magicdec.runtime.engine import MAX_GAMMA, Engine, RequestError
from mlc_magicdec.runtime.views import DEFAULT_SINK, DEFAULT_WINDOW, DraftSettings


@pytest.fixture(scope="module")
def engine(tiny_models) -> Engine:
    return Engine(tiny_models("llama")[2])


@pytest.fixture(scope="module")
def batch(engine):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, TINY_VOCAB, n).tolist() for n in (60, 45, 80)]
    b = engine.prefill(prompts, max_new_tokens=8)
    yield b
    engine.release(b)


@pytest.fixture(scope="module")
def plain(engine, batch):
    return [r.token_ids for r in engine.decode(batch, stop_at_eos=False)]


BAD = {
    # budget at or above the context window
    "budget-at-context": dict(draft="snapkv", budget=TINY_CONTEXT),
    "budget-above-context": dict(draft="streamingllm", budget=TINY_CONTEXT + 1000),
    "budget-zero": dict(draft="streamingllm", budget=0),
    "budget-negative": dict(draft="snapkv", budget=-5),
    # budget that leaves nothing beyond the sinks / the observation window
    "budget-equals-sink": dict(draft="streamingllm", budget=DEFAULT_SINK),
    "budget-below-sink": dict(draft="streamingllm", budget=DEFAULT_SINK - 2),
    "budget-equals-window": dict(draft="snapkv", budget=DEFAULT_WINDOW),
    "budget-below-window": dict(draft="snapkv", budget=DEFAULT_WINDOW // 2),
    "settings-budget-equals-sink": dict(draft_settings=DraftSettings("streamingllm", budget=8, sink=8)),
    "settings-budget-below-window": dict(draft_settings=DraftSettings("snapkv", budget=20, window=24)),
    "settings-negative-sink": dict(draft_settings=DraftSettings("streamingllm", budget=20, sink=-1)),
    "settings-even-kernel": dict(draft_settings=DraftSettings("snapkv", budget=64, pool_kernel=4)),
    "settings-one-bad-of-three": dict(draft_settings=[DraftSettings("snapkv", budget=64),
                                                      DraftSettings("streamingllm", budget=TINY_CONTEXT),
                                                      DraftSettings("streamingllm", budget=64)]),
    # gamma
    "gamma-0": dict(gamma=0),
    "gamma-minus-1": dict(gamma=-1),
    "gamma-1000": dict(gamma=1000),
    "gamma-above-max": dict(gamma=MAX_GAMMA + 1),
    "gamma-2.5": dict(gamma=2.5),
    "gamma-string": dict(gamma="3"),
    # draft kind
    "draft-foo": dict(draft="foo"),
    "settings-draft-foo": dict(draft_settings=DraftSettings("foo", budget=64)),
    # per-sequence budgets of the wrong length (the batch has 3 prompts)
    "budgets-too-few": dict(draft="snapkv", budget=[64, 128]),
    "budgets-too-many": dict(draft="streamingllm", budget=[64, 128, 256, 64]),
    "budgets-one-bad": dict(draft="snapkv", budget=[64, 16, 128]),
    # per-sequence draft settings of the wrong length
    "settings-too-few": dict(draft_settings=[DraftSettings("snapkv", budget=64)] * 2),
    "settings-too-many": dict(draft_settings=[DraftSettings("streamingllm", budget=64)] * 4),
    # automatic speculation (refused before it would calibrate anything)
    "auto-with-settings": dict(gamma="auto", draft_settings=DraftSettings("snapkv", budget=64)),
    "auto-budgets-per-sequence": dict(gamma="auto", budget=[64, 64, 64]),
    "auto-gamma-word": dict(gamma="fast", budget="auto"),
    "auto-gamma-too-big": dict(gamma=MAX_GAMMA + 1, budget="auto"),
    "auto-budget-at-context": dict(gamma="auto", budget=TINY_CONTEXT),
    "auto-budget-zero": dict(gamma="auto", budget=0),
    "auto-draft-foo": dict(draft="foo", gamma="auto"),
}


@pytest.mark.parametrize("kwargs", list(BAD.values()), ids=list(BAD))
def test_bad_speculative_settings_are_one_line_request_errors(engine, batch, plain, kwargs):
    with pytest.raises(RequestError) as info:
        engine.decode(batch, speculate=True, stop_at_eos=False, **kwargs)
    err = info.value
    assert isinstance(err, UserError)
    message = str(err)
    assert message and "\n" not in message, repr(message)
    assert "Traceback" not in message
    # the request was refused before generating: the batch decodes exactly as before
    assert [r.token_ids for r in engine.decode(batch, stop_at_eos=False)] == plain


def test_messages_name_the_problem(engine, batch):
    def message(**kwargs) -> str:
        with pytest.raises(RequestError) as info:
            engine.decode(batch, speculate=True, **kwargs)
        return str(info.value)

    assert str(TINY_CONTEXT) in message(draft="snapkv", budget=TINY_CONTEXT)
    assert "gamma" in message(gamma=0)
    assert "gamma" in message(gamma=2.5)
    assert "foo" in message(draft="foo")
    assert "sink" in message(draft="streamingllm", budget=DEFAULT_SINK)
    assert "window" in message(draft="snapkv", budget=DEFAULT_WINDOW)
    assert "3" in message(draft="snapkv", budget=[64, 64])  # three prompts
    assert "one for the whole batch" in message(gamma="auto", budget=[64, 64, 64])
    assert "'fast'" in message(gamma="fast", budget="auto")
    assert "draft_settings" in message(gamma="auto", draft_settings=DraftSettings("snapkv", budget=64))


def test_auto_needs_room_for_drafts(tiny_models):
    engine = Engine(tiny_models("llama")[2])
    with engine.prefill([[5, 6, 7] * 20], max_new_tokens=4, max_gamma=0) as plain_only:
        with pytest.raises(RequestError, match="max_gamma"):
            engine.decode(plain_only, speculate=True, gamma="auto", budget="auto")


def test_generate_refuses_bad_settings_and_frees_its_pages(tiny_models):
    """``generate`` prefills itself: a refused request must not leak its KV pages."""
    engine = Engine(tiny_models("llama")[2])  # its own pool: the module's engine holds a prefilled batch
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, TINY_VOCAB, 40).tolist() for _ in range(2)]
    engine.generate(prompts, max_new_tokens=4)  # the pool exists and is big enough
    free = engine.target.pages.free_pages
    for kwargs in (dict(gamma=0), dict(draft="foo"), dict(budget=TINY_CONTEXT), dict(budget=[64])):
        with pytest.raises(RequestError):
            engine.generate(prompts, max_new_tokens=4, speculate=True, **kwargs)
        assert engine.target.pages.free_pages == free


def test_gamma_beyond_what_prefill_reserved_is_refused(tiny_models):
    engine = Engine(tiny_models("llama")[2])  # its own pool: the module's engine holds a prefilled batch
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, TINY_VOCAB, 30).tolist() for _ in range(2)]
    with engine.prefill(prompts, max_new_tokens=6, max_gamma=2) as small:
        plain = [r.token_ids for r in engine.decode(small, stop_at_eos=False)]
        with pytest.raises(RequestError) as info:
            engine.decode(small, speculate=True, gamma=3, budget=64, stop_at_eos=False)
        assert "\n" not in str(info.value) and "max_gamma" in str(info.value)
        spec = engine.decode(small, speculate=True, gamma=2, draft="streamingllm", budget=8,
                             stop_at_eos=False)
        assert [r.token_ids for r in spec] == plain


def test_good_settings_at_the_limits_are_accepted(engine, batch, plain):
    """The boundaries themselves are valid: budget just above the sink/window and just below the context,
    gamma 1 and MAX_GAMMA."""
    for kwargs in (dict(draft="streamingllm", budget=DEFAULT_SINK + 1, gamma=1),
                   dict(draft="snapkv", budget=DEFAULT_WINDOW + 1, gamma=MAX_GAMMA),
                   dict(draft="streamingllm", budget=TINY_CONTEXT - 1, gamma=2),
                   dict(draft="snapkv", budget=[DEFAULT_WINDOW + 1, 100, TINY_CONTEXT - 1],
                        gamma=np.int64(3))):
        results = engine.decode(batch, speculate=True, stop_at_eos=False, **kwargs)
        assert [r.token_ids for r in results] == plain, kwargs
