"""A GGUF file's tokenizer, rebuilt from its metadata with ``tokenizers`` (BPE and SentencePiece)."""

from __future__ import annotations

from typing import Any

from ..config import ModelError
from .gguf_meta import GGUFMeta
from .source import check_tokenizer_json

# Pre-tokenizer split regexes, by `tokenizer.ggml.pre` (llama.cpp's names; see llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = {"default", "gpt-2", "gpt2", "phi-2", "olmo"}  # the GPT-2 regex of ByteLevel itself
_DIGITS_GPT2_PRE = {"smollm", "starcoder", "refact", "codeshell"}  # each \p{N} alone, then the GPT-2 regex
_REGEX_PRE = {  # pre -> (split regex, NFC-normalize as the original tokenizer.json does, ignore_merges)
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, True),
    "smaug-bpe": (_LLAMA3_SPLIT, False, True),
    "falcon3": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, True, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, True, False),
    "tekken": (_TEKKEN_SPLIT, False, False),
}
_SPM_SPACE = "\u2581"  # SentencePiece's word-boundary marker


def gguf_tokenizer_json(meta: GGUFMeta, where: str = "GGUF") -> str:
    """Build the tokenizer a GGUF describes and return it serialized as tokenizer.json."""
    import gguf

    K = gguf.Keys.Tokenizer
    embedded = meta.get(K.HF_JSON)
    if embedded:
        check_tokenizer_json(embedded, where)
        return embedded
    model = meta.get(K.MODEL)
    tokens = meta.get(K.LIST)
    if model is None or not tokens:
        raise ModelError(f"{where} has no tokenizer metadata; it cannot be used without a tokenizer")
    tokens = list(tokens)
    types = list(meta.get(K.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens))
    if model == "gpt2":
        tok = _byte_level_tokenizer(meta, tokens, where)
    elif model == "llama":
        tok = _sentencepiece_tokenizer(meta, tokens, types)
    else:
        raise ModelError(
            f"{where} uses tokenizer model {model!r}, which is not supported yet (supported: gpt2, llama)"
        )
    _add_special_tokens(tok, tokens, types, byte_level=model == "gpt2")
    _set_post_processor(tok, meta, tokens, byte_level=model == "gpt2")
    return tok.to_str()


def _merges(meta: GGUFMeta) -> list[tuple[str, str]] | None:
    import gguf

    merges = meta.get(gguf.Keys.Tokenizer.MERGES)
    if merges is None:
        return None
    return [(a, b) for a, _, b in (m.partition(" ") for m in merges)]


def _byte_level_tokenizer(meta: GGUFMeta, tokens: list[str], where: str) -> Any:
    import gguf
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = meta.get(gguf.Keys.Tokenizer.PRE, "default")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def respell(token: str) -> str:  # tokens outside the byte alphabet are stored as raw text
        return token if set(token) <= alphabet else "".join(s for s, _ in spell.pre_tokenize_str(token))

    vocab = {respell(t): i for i, t in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        raise ModelError(f"{where} has a gpt2 tokenizer without merges; the file is incomplete")
    ignore_merges = False
    normalizer = None
    if pre in _GPT2_PRE:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGITS_GPT2_PRE:
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _REGEX_PRE:
        split, nfc, ignore_merges = _REGEX_PRE[pre]
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        normalizer = normalizers.NFC() if nfc else None
    else:
        raise ModelError(
            f"{where} uses pre-tokenizer {pre!r}, which is not supported yet; supported: "
            f"{', '.join(sorted(_GPT2_PRE | _DIGITS_GPT2_PRE | set(_REGEX_PRE)))}"
        )
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best
    merged-token score first (as transformers' converters derive them)."""
    merges = []
    for token, score in zip(vocab, scores, strict=True):
        splits = ((token[:k], token[k:]) for k in range(1, len(token)))
        pairs = [(a, b) for a, b in splits if a in vocab and b in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(score, len(a), len(b), a, b) for a, b in pairs]
    merges.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(a, b) for *_, a, b in merges]


def _sentencepiece_tokenizer(meta: GGUFMeta, tokens: list[str], types: list[int]) -> Any:
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    K = gguf.Keys.Tokenizer
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        scores = meta.get(K.SCORES)
        scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
        merges = _spm_merges({t: vocab[t] for t in tokens}, [scores[vocab[t]] for t in tokens])
    unk_id = meta.get(K.UNK_ID)
    unk = tokens[int(unk_id)] if unk_id is not None else None
    add_prefix = bool(meta.get(K.ADD_PREFIX, True))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPM_SPACE, prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special_tokens(tok: Any, tokens: list[str], types: list[int], *, byte_level: bool) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens (kept whole)."""
    import gguf
    from tokenizers import AddedToken, pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    control = [
        t
        for t, k in zip(tokens, types, strict=True)
        if k == gguf.TokenType.CONTROL and (not byte_level or set(t) <= alphabet)
    ]  # anything else is a llama.cpp mislabel
    user = [t for t, k in zip(tokens, types, strict=True) if k == gguf.TokenType.USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_post_processor(tok: Any, meta: GGUFMeta, tokens: list[str], *, byte_level: bool) -> None:
    import gguf
    from tokenizers import processors

    K = gguf.Keys.Tokenizer
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    bos_id, eos_id = meta.get(K.BOS_ID), meta.get(K.EOS_ID)
    add_bos = bool(meta.get(K.ADD_BOS, not byte_level)) and bos_id is not None
    add_eos = bool(meta.get(K.ADD_EOS, False)) and eos_id is not None
    if add_bos or add_eos:
        bos = [tokens[int(bos_id)]] if add_bos else []
        eos = [tokens[int(eos_id)]] if add_eos else []
        single = " ".join([*bos, "$A", *eos])
        pair = " ".join([*bos, "$A", *eos, *bos, "$B:1", *eos])
        special = [(tokens[int(i)], int(i)) for i in dict.fromkeys([bos_id] * add_bos + [eos_id] * add_eos)]
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=special))
    if steps:
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
