"""Loading a compiled artifact: validate it, load the library and weights onto the device."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import tvm
from tokenizers import Tokenizer
from tvm.contrib import tvmjs
from tvm.runtime.vm import VirtualMachine

from ..compile.config import ModelConfig
from ..constants import DTYPE_BYTES
from ..errors import TargetError, UserError, one_line
from ..hashing import file_sha256
from ..manifest import CONFIG_NAME, WEIGHTS_NAME, Manifest, ManifestError, stored_weight_bytes
from . import costmodel as cm
from . import opencl


class ArtifactError(UserError, ValueError):
    """An artifact folder that cannot be used; the message is one line and says what to do."""


def device_from_string(device: str) -> tvm.runtime.Device:
    """``"cpu"`` / ``"cuda:0"`` to a TVM device; raises TargetError if it is not present here."""
    kind, _, index = device.partition(":")
    dev = tvm.runtime.device(kind, int(index or 0))
    if not dev.exist:
        raise TargetError(
            f"this artifact runs on {device}, which this machine does not have; "
            f"compile it again with --target llvm to run on the CPU"
        )
    return dev


def _check_shards(path: Path) -> None:
    """Every weight shard named in tensor-cache.json exists with the recorded size (cheap; no hashing)."""
    try:
        records = json.loads((path / WEIGHTS_NAME).read_text())["records"]
        for shard in records:
            file = path / shard["dataPath"]
            if not file.is_file() or file.stat().st_size != shard["nbytes"]:
                raise ArtifactError(f"weight shard {file.name} is missing or truncated; compile again")
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path / WEIGHTS_NAME} is corrupt ({e}); compile again") from None


@dataclasses.dataclass
class Artifact:
    """A loaded artifact: config, VM functions, parameters on the device and the tokenizer."""

    path: Path
    config: Manifest
    model: ModelConfig
    device: tvm.runtime.Device
    vm: VirtualMachine
    params: list[tvm.runtime.Tensor]
    tokenizer: Tokenizer

    @property
    def dtype(self) -> str:
        return self.config.dtype

    @property
    def kv_dtype(self) -> str:
        return self.config.pool_dtype

    @property
    def spec(self) -> cm.ModelSpec:
        """The cost model's view of this artifact's model (its weight and KV bytes)."""
        return cm.ModelSpec(
            self.model,
            DTYPE_BYTES[self.dtype],
            self.path.name,
            DTYPE_BYTES[self.kv_dtype],
            stored_weight_bytes(self.path),
        )

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Load and validate the artifact folder ``path``; raises ArtifactError with a one-line message."""
        path = Path(path)
        cfg_path = path / CONFIG_NAME
        try:
            config = Manifest.load(path)
        except ManifestError as e:
            raise ArtifactError(str(e)) from None
        try:
            model = ModelConfig.from_dict(config.model)
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{cfg_path} is corrupt ({e}); compile the model again") from None
        library, hashes = path / config.library, config.hashes
        if library.suffix == ".tar":
            raise ArtifactError(
                f"{library} holds unlinked Metal objects; link them on this Mac first: "
                f"mlc-magicdec link {path}"
            )
        files = [("library", library), ("weights", path / WEIGHTS_NAME)]
        if config.kernel_table:
            files.append(("kernel_table", path / config.kernel_table))
        for name, file in files:
            if not file.is_file():
                raise ArtifactError(f"{file} is missing; compile the model again")
            if file_sha256(file) != hashes.get(name):
                raise ArtifactError(
                    f"{file.name} does not match the artifact's recorded hash "
                    f"(library and weights come from different compiles); compile again"
                )
        _check_shards(path)
        if config.kernel_table:
            try:
                opencl.register(path / config.kernel_table)
            except opencl.OpenCLUnavailable as e:
                raise ArtifactError(f"{path} is a --target pocl artifact: {e}") from None
            except (OSError, ValueError, KeyError) as e:
                raise ArtifactError(f"{path / config.kernel_table} is corrupt ({e}); compile again") from None
        try:
            device = device_from_string(config.device)
        except TargetError as e:
            raise ArtifactError(str(e)) from None
        try:
            vm = VirtualMachine(tvm.runtime.load_module(str(library)), device)
            cache, _ = tvmjs.load_tensor_cache(str(path), device)
            params = [cache[name] for name in config.param_names]
        except KeyError as e:
            raise ArtifactError(f"weights lack parameter {e.args[0]!r}; compile the model again") from None
        except Exception as e:  # noqa: BLE001 - TVM raises many kinds; report one line
            raise ArtifactError(f"cannot load {path}: {one_line(e)}") from None
        try:
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        return cls(path, config, model, device, vm, params, tokenizer)
