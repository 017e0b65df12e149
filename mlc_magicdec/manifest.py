"""The artifact folder's config file: its name and format version (TVM-free; read by compile and runtime)."""

from __future__ import annotations

CONFIG_NAME = "mlc-magicdec-config.json"
ARTIFACT_FORMAT = 1  # bump whenever the library's functions or the pool layout change
