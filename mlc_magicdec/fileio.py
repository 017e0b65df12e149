"""Atomic file writes: a temporary file beside the target, renamed over it; a failure leaves no half file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any, indent: int = 2) -> None:
    """``data`` as JSON (anything else as its ``str``), written atomically to ``path``."""
    atomic_write_text(path, json.dumps(data, indent=indent, default=str))
