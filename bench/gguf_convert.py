"""A GGUF of the same weights at a wider dtype (F32 or F16), for a like-for-like llama.cpp peer.

Every tensor of the source is dequantized with the ``gguf`` package and written, in the same order and with
every metadata key of the source (``general.file_type`` updated), by ``gguf.GGUFWriter``. In an F16 file the
one-dimensional tensors (norms, biases) stay F32, as llama.cpp's own converter writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize

from ..errors import UserError

DTYPES = {"f32": (np.float32, LlamaFileType.ALL_F32), "f16": (np.float16, LlamaFileType.MOSTLY_F16)}
ARCH_KEY = "general.architecture"
FILE_TYPE_KEY = "general.file_type"
INTERNAL_PREFIX = "GGUF."  # the reader's view of the header (version, counts), not metadata


class ConversionError(UserError, ValueError):
    """A GGUF that cannot be converted; the message is one line."""


def converted_path(source: Path, dtype: str) -> Path:
    """Where the converted copy of ``source`` is cached: next to it, named by dtype."""
    return source.with_name(f"{source.stem}.{dtype.upper()}{source.suffix}")


def _field_value(field):
    """A reader field's value in the form ``GGUFWriter.add_key_value`` takes, with its value types."""
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        return field.contents(), vtype, field.types[-1] if len(field.types) > 1 else None
    return field.contents(), vtype, None


def convert(source: Path, dtype: str, dest: Path | None = None) -> Path:
    """Write ``source`` with every tensor as ``dtype`` (``f32`` or ``f16``); returns the new file's path.

    An existing converted file newer than its source is reused.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"unknown GGUF dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    dest = dest or converted_path(source, dtype)
    if dest.exists() and dest.stat().st_mtime >= source.stat().st_mtime:
        return dest
    np_dtype, file_type = DTYPES[dtype]
    reader = GGUFReader(source)
    arch_field = reader.get_field(ARCH_KEY)
    if arch_field is None:
        raise ConversionError(f"{source} has no {ARCH_KEY}; it is not a model GGUF")
    tmp = dest.with_suffix(dest.suffix + ".part")
    writer = GGUFWriter(tmp, arch_field.contents())
    for name, field in reader.fields.items():
        if name.startswith(INTERNAL_PREFIX) or name in (ARCH_KEY, FILE_TYPE_KEY):
            continue
        value, vtype, sub_type = _field_value(field)
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    writer.add_file_type(int(file_type))
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape([int(n) for n in reversed(tensor.shape)])
        writer.add_tensor(tensor.name, values if values.ndim == 1 else values.astype(np_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dest)
    return dest
