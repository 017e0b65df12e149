"""The artifact manifest, ``mlc-magicdec-config.json``: the only reader and writer of that file.

It records what a compile produced (the model's config, the target, the library and weight files and their
hashes) so that the runtime can check that library and weights belong together. TVM-free.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import atomic_write_json

CONFIG_NAME = "mlc-magicdec-config.json"
WEIGHTS_NAME = "tensor-cache.json"  # TVM's weight index (tvmjs): shards, and each tensor's record
ARTIFACT_FORMAT = 2  # bump whenever the library's functions or the pool layout change


class ManifestError(UserError, ValueError):
    """A manifest that is missing, corrupt or from another version; the message is one line."""


@dataclasses.dataclass
class Manifest:
    """What one compile wrote into an artifact folder."""

    model: dict[str, Any]  # ModelConfig.to_dict()
    source: str  # the model file or folder it was compiled from
    dtype: str  # of weights and activations
    target: dict[str, Any]  # TargetPreset.describe(): kind, device, ...
    library: str  # file name of the compiled library in the folder
    param_names: list[str]  # the library's parameters, in order, as named in tensor-cache.json
    hashes: dict[str, str]  # sha256 of "library", "weights" (tensor-cache.json) and, for PoCL, "kernel_table"
    version: str = ""  # mlc-magicdec's version that compiled it
    format: int = ARTIFACT_FORMAT
    drafts: list[str] = dataclasses.field(default_factory=list)  # draft views asked for at compile time
    draft_budget: int | None = None  # default draft budget (tokens), if given at compile time
    kernels: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # TIR kernels per entry point
    kernel_table: str | None = None  # PoCL: the OpenCL kernels' table (compile.opencl)
    resources: dict[str, Any] | None = None  # CUDA: {arch: {kernel: registers, shared, spills}} (ptxas)
    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    chat_template: str | None = None  # the model's jinja2 chat template, if it has one
    kv_dtype: str | None = None  # of the KV pool (None: ``dtype``)
    quantization: str = (
        "none"  # of the linear weights (constants.QUANTIZATIONS); formats in tensor-cache.json
    )

    @property
    def pool_dtype(self) -> str:
        """The KV pool's dtype."""
        return self.kv_dtype or self.dtype

    @property
    def dtype_label(self) -> str:
        """``float32``, or ``float32, KV float16`` where the pool's dtype differs (for report headers)."""
        label = self.dtype if self.quantization == "none" else f"{self.quantization}, {self.dtype}"
        return label if self.pool_dtype == self.dtype else f"{label}, KV {self.pool_dtype}"

    @property
    def device(self) -> str:
        """The device string the artifact runs on (``cpu``, ``cuda:0``, ...)."""
        return self.target["device"]

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """The manifest of ``folder``; raises ManifestError (one line, says what to do)."""
        folder = Path(folder)
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise ManifestError(
                f"{folder} is not an mlc-magicdec artifact (no {CONFIG_NAME}); "
                f"create one with `mlc-magicdec compile`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            fmt = data.get("format")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{path} is corrupt ({e}); compile the model again") from None
        if fmt != ARTIFACT_FORMAT:
            raise ManifestError(
                f"{folder} was compiled by another version of mlc-magicdec (artifact format "
                f"{fmt}, this version reads {ARTIFACT_FORMAT}); compile it again"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in names})
            manifest.validate()
        except (TypeError, ValueError, KeyError) as e:
            raise ManifestError(f"{path} is corrupt ({e}); compile the model again") from None
        return manifest

    @staticmethod
    def model_of(folder: str | Path) -> tuple[dict[str, Any], str | None, str | None]:
        """Just the model config, dtype and KV dtype of ``folder``'s manifest (what a cost estimate needs,
        from any version's artifact); raises ManifestError if they cannot be read."""
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model, dtype = data["model"], data.get("dtype")
            kv_dtype = data.get("kv_dtype") or dtype
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{path} is corrupt ({e}); compile the model again") from None
        dtypes_ok = all(isinstance(d, (str, type(None))) for d in (dtype, kv_dtype))
        if not isinstance(model, dict) or not dtypes_ok:
            raise ManifestError(f"{path} is corrupt (no model config); compile the model again")
        return model, dtype, kv_dtype

    def validate(self) -> None:
        """Raise ValueError if a field has the wrong type."""
        expect = {
            "model": dict,
            "source": str,
            "dtype": str,
            "target": dict,
            "library": str,
            "param_names": list,
            "hashes": dict,
        }
        for name, kind in expect.items():
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name!r} is not a {kind.__name__}")
        if not isinstance(self.kv_dtype, (str, type(None))):
            raise ValueError("'kv_dtype' is not a str")
        if not isinstance(self.target.get("device"), str):
            raise ValueError("'target' has no 'device'")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to the file (the optional CUDA and PoCL fields only when set)."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if not (k in ("kernel_table", "resources") and v is None)}

    def save(self, folder: str | Path) -> Path:
        """Write the manifest into ``folder`` atomically; returns the file's path."""
        path = Path(folder) / CONFIG_NAME
        atomic_write_json(path, self.to_dict())
        return path


def stored_weight_bytes(folder: str | Path) -> int | None:
    """Bytes of all the weights an artifact folder holds (its shards), or None if its index is unreadable."""
    try:
        return sum(
            shard["nbytes"] for shard in json.loads((Path(folder) / WEIGHTS_NAME).read_text())["records"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
