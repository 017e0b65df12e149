"""The one link step of a Metal artifact: its ``model.tar`` of objects -> ``model.dylib``, on macOS.

TVM cross-compiles Metal libraries on any machine, but only Xcode's toolchain links Mach-O, so ``compile
--target metal`` writes the objects as a tar and this step (``mlc-magicdec link ARTIFACT``) links them on the
Mac, then points the artifact's config at the dylib. By hand it is::

    mkdir objs && tar -xf ARTIFACT/model.tar -C objs
    xcrun clang -dynamiclib -undefined dynamic_lookup -o ARTIFACT/model.dylib objs/*.o

``mlc-magicdec link`` runs that link and also records the dylib's name and hash in the artifact's config,
which the runtime checks.
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import UserError, one_line
from ..hashing import file_sha256
from ..manifest import Manifest, ManifestError

DYLIB_NAME = "model.dylib"


class LinkError(UserError, RuntimeError):
    """An artifact that cannot be linked here; the message is one line."""


def link_metal(artifact: str | os.PathLike) -> Path:
    """Link ``artifact``'s Metal objects into ``model.dylib``, record it in the config; return its path."""
    path = Path(artifact)
    try:
        config = Manifest.load(path)
    except ManifestError as e:
        raise LinkError(str(e)) from None
    if config.target.get("kind") != "metal":
        raise LinkError(f"{path} is not a Metal artifact; only --target metal artifacts need linking")
    if config.library == DYLIB_NAME and (path / DYLIB_NAME).is_file():
        return path / DYLIB_NAME
    if sys.platform != "darwin":
        raise LinkError(
            "linking a Metal artifact needs macOS with Xcode's clang; copy the artifact to the Mac and run "
            f"`mlc-magicdec link {path.name}` there (or the xcrun command in the README)"
        )
    from tvm.support import cc

    tar = path / config.library
    dylib = path / DYLIB_NAME
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tar) as archive:
            archive.extractall(tmp, filter="data")
        objects = sorted(str(p) for p in Path(tmp).iterdir() if p.suffix == ".o")
        partial = path / f".{DYLIB_NAME}.partial"
        try:
            cc.create_shared(str(partial), objects, cc="clang")
        except RuntimeError as e:
            raise LinkError(f"clang could not link {tar.name}: {one_line(e)}") from None
        os.replace(partial, dylib)
    config.library = DYLIB_NAME
    config.hashes["library"] = file_sha256(dylib)
    config.save(path)
    return dylib
