"""The shipped Austen texts: found inside the package, overridable, and loud when missing."""

from __future__ import annotations

import lzma
import subprocess
from pathlib import Path

import pytest

from mlc_magicdec import texts

REPO = Path(__file__).resolve().parents[1]


def test_the_six_novels_ship_with_the_package():
    folder = texts.texts_dir()
    assert folder.is_relative_to(Path(texts.__file__).parent)
    books = texts.novels()
    assert sorted(books) == sorted(texts.NOVELS)
    for name, text in books.items():
        assert len(text) > 400_000, name
        assert "Austen" in text[:2000], name


def test_demo_prompt_is_chapters_one_to_three():
    prompt = texts.demo_prompt()
    assert prompt.startswith("PRIDE AND PREJUDICE")
    assert "\nChapter 3\n" in prompt and "\nChapter 4\n" not in prompt
    assert prompt.rstrip().endswith("I quite detest the man.\"")


def test_a_folder_of_other_texts_is_taken_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "persuasion.txt").write_text("Sir Walter Elliot, of Kellynch Hall", encoding="utf-8")
    (tmp_path / "emma.txt.xz").write_bytes(lzma.compress(b"Emma Woodhouse, handsome"))
    monkeypatch.setenv(texts.TEXTS_ENV, str(tmp_path))
    assert texts.read_text("persuasion") == "Sir Walter Elliot, of Kellynch Hall"
    assert texts.read_text("emma") == "Emma Woodhouse, handsome"


@pytest.mark.parametrize("content", [None, b"", b"not xz at all", lzma.compress(b"  \n\t ")])
def test_a_missing_empty_or_corrupt_text_fails_in_one_line(tmp_path, monkeypatch, content):
    if content is not None:
        (tmp_path / "emma.txt.xz").write_bytes(content)
    monkeypatch.setenv(texts.TEXTS_ENV, str(tmp_path))
    with pytest.raises(texts.TextError) as excinfo:
        texts.read_text("emma")
    message = str(excinfo.value)
    assert "emma" in message and str(tmp_path) in message and "\n" not in message


def test_nothing_tracked_reads_outside_the_repository():
    """No code, test or doc points at the build machines' folder beside the checkout."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    offenders = []
    for name in tracked.stdout.split():
        path = REPO / name
        if path.suffix in {".xz", ".png", ".bin"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in ("../shared", "/work/", '"shared" / "data"', "shared/data"):
            if needle in text and path != Path(__file__).resolve():
                offenders.append(f"{name}: {needle}")
    assert not offenders, offenders
