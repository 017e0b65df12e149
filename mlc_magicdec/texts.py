"""The public-domain texts the demo, the benchmarks and the tests use: Jane Austen's six novels.

They ship inside the package, xz-compressed, in ``mlc_magicdec/data/texts/``. ``$MLC_MAGICDEC_TEXTS`` points
at another folder of ``NAME.txt`` (or ``NAME.txt.xz``) files instead. This module is the one place that
finds them, and it does not import TVM.
"""

from __future__ import annotations

import lzma
import os
from importlib import resources
from pathlib import Path

from .errors import UserError

TEXTS_ENV = "MLC_MAGICDEC_TEXTS"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
DEMO_NOVEL, DEMO_CHAPTERS = "prideprejudice", 3  # the demo continues Pride and Prejudice after chapter 3
BENCH_NOVEL = "persuasion"  # the benchmarks' default prompt source


class TextError(UserError):
    """A text that is missing, empty or unreadable."""


def texts_dir() -> Path:
    """The folder the texts are read from: ``$MLC_MAGICDEC_TEXTS`` if set, else the package's own."""
    env = os.environ.get(TEXTS_ENV)
    if env:
        return Path(env).expanduser()
    return Path(str(resources.files("mlc_magicdec").joinpath("data", "texts")))


def read_text(name: str) -> str:
    """The text called ``name`` (e.g. ``"emma"``), from ``NAME.txt`` or ``NAME.txt.xz`` in ``texts_dir()``."""
    folder = texts_dir()
    plain, packed = folder / f"{name}.txt", folder / f"{name}.txt.xz"
    try:
        if plain.is_file():
            text = plain.read_text(encoding="utf-8")
        elif packed.is_file():
            text = lzma.decompress(packed.read_bytes()).decode("utf-8")
        else:
            hint = f"unset ${TEXTS_ENV}" if os.environ.get(TEXTS_ENV) else "reinstall mlc-magicdec"
            raise TextError(f"no text {name!r} ({name}.txt or {name}.txt.xz) in {folder}; {hint}")
    except (OSError, UnicodeDecodeError, lzma.LZMAError) as e:
        raise TextError(f"cannot read the text {name!r} in {folder}: {e}") from None
    if not text.strip():
        raise TextError(f"the text {name!r} in {folder} is empty")
    return text


def novels() -> dict[str, str]:
    """All six novels, ``name -> text``."""
    return {name: read_text(name) for name in NOVELS}


def demo_prompt() -> str:
    """The demo's long prompt: the first ``DEMO_CHAPTERS`` chapters of Pride and Prejudice."""
    text = read_text(DEMO_NOVEL)
    end = text.find(f"\nChapter {DEMO_CHAPTERS + 1}\n")
    if end < 0:
        raise TextError(f"the text {DEMO_NOVEL!r} in {texts_dir()} has no chapter {DEMO_CHAPTERS + 1}")
    return text[: end + 1]
