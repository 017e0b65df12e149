"""Group-quantized linear weights: the formats, quantizing and packing them (numpy, at compile time), and
the dequantize expression the model's matmuls read them through.

A format stores a weight ``[out, in]`` as ``bits``-bit codes in groups of ``GROUP_SIZE`` along ``in``, one
scale per group (Q4_1 also one min): ``w = scale * (code - zero) + min``. The GGUF formats (``Q4_0``,
``Q4_1``, ``Q8_0``) hold llama.cpp's blocks with the same codes and scales, so they dequantize to exactly
the numbers llama.cpp (and ``gguf.quants``) computes. The MLC-LLM schemes (``q4f16_1``, ``q4f32_1``, and
``q8f16_1``) are symmetric: ``scale = max|w| / max_code``, ``zero`` the middle code.

In a CPU artifact a quantized linear ``[in, out]`` is three tensors: ``codes[in * bits / 32, out]`` (uint32,
each word the codes of ``32 / bits`` consecutive inputs, the lowest bits first), ``scale[in / 32, out]`` and,
with a min, ``min[in / 32, out]``. Outputs are the innermost axis, as for float weights, so a matmul streams
them and a vector of outputs shares one input's codes word. GPU artifacts store the transpose (``out_in``:
``codes[out, in * bits / 32]``, ``scale[out, in / 32]``, as GGUF blocks and MLC-LLM do), so the threads that
reduce one output along its row read consecutive words.
"""

from __future__ import annotations

import dataclasses

import numpy as np

GROUP_SIZE = 32  # inputs per scale (llama.cpp's QK4_0 / QK8_0, MLC's group_size)
WORD_BITS = 32  # codes are packed into uint32 words
CODE_DTYPE = "uint32"


@dataclasses.dataclass(frozen=True)
class GroupFormat:
    """One group-quantization format: ``w = scale * (code - zero) [+ min]`` per group of inputs."""

    name: str
    bits: int
    scale_dtype: str
    zero: int  # the code of 0.0 (0 with a min)
    has_min: bool = False

    @property
    def codes_per_word(self) -> int:
        return WORD_BITS // self.bits

    @property
    def max_magnitude(self) -> int:
        """The largest ``|code - zero|`` a symmetric quantizer uses (7 for 4 bits, 127 for 8)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def tensors(self) -> tuple[str, ...]:
        """The artifact tensors of one quantized linear (suffixes of its name)."""
        return ("codes", "scale", "min") if self.has_min else ("codes", "scale")

    def param_shapes(
        self, in_features: int, out_features: int, out_in: bool = False
    ) -> dict[str, tuple[tuple[int, int], str]]:
        """``name -> (shape, dtype)`` of the tensors that hold a ``[in, out]`` weight (transposed with
        ``out_in``)."""
        orient = (lambda rows, cols: (cols, rows)) if out_in else (lambda rows, cols: (rows, cols))  # noqa: E731
        groups = orient(in_features // GROUP_SIZE, out_features)
        shapes = {
            "codes": (orient(in_features // self.codes_per_word, out_features), CODE_DTYPE),
            "scale": (groups, self.scale_dtype),
        }
        if self.has_min:
            shapes["min"] = (groups, self.scale_dtype)
        return shapes

    def bytes_per_weight(self) -> float:
        scale_bytes = np.dtype(self.scale_dtype).itemsize * (2 if self.has_min else 1)
        return self.bits / 8 + scale_bytes / GROUP_SIZE


FORMATS = {
    f.name: f
    for f in (
        GroupFormat("q4f16_1", 4, "float16", zero=7),
        GroupFormat("q4f32_1", 4, "float32", zero=7),
        GroupFormat("q8f16_1", 8, "float16", zero=127),
        GroupFormat("Q4_0", 4, "float16", zero=8),
        GroupFormat("Q4_1", 4, "float16", zero=0, has_min=True),
        GroupFormat("Q8_0", 8, "float16", zero=128),  # int8 codes, stored offset by 128
    )
}
GGUF_KEPT = ("Q4_0", "Q4_1", "Q8_0")  # GGUF block types whose blocks an artifact keeps as they are
FLOAT_TYPES = (
    "float",
    "F32",
    "F16",
    "BF16",
)  # how files store unquantized tensors (WeightSource.stored_type)
GGUF_FALLBACK = "q8f16_1"  # what `--quantization gguf` re-quantizes the file's other block types to


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight: ``codes[out, in]`` (uint8, unpacked), ``scale`` and ``min``
    (``[out, in / 32]``)."""

    fmt: GroupFormat
    codes: np.ndarray
    scale: np.ndarray
    min: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """The float32 ``[out, in]`` weight, computed as the model's ``dequantize`` does."""
        groups = lambda a: np.repeat(a.astype(np.float32), GROUP_SIZE, axis=1)  # noqa: E731
        w = groups(self.scale) * (self.codes.astype(np.float32) - np.float32(self.fmt.zero))
        return w + groups(self.min) if self.min is not None else w

    def take_rows(self, rows: np.ndarray) -> QuantizedWeight:
        """The weight with its output rows reordered (llama.cpp's q/k permutation undone)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return QuantizedWeight(self.fmt, self.codes[rows], self.scale[rows], pick(self.min))

    @staticmethod
    def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Parts of one format concatenated along the outputs (fused q/k/v, gate/up)."""
        cat = lambda a: None if a[0] is None else np.concatenate(a, axis=0)  # noqa: E731
        return QuantizedWeight(
            parts[0].fmt,
            cat([p.codes for p in parts]),
            cat([p.scale for p in parts]),
            cat([p.min for p in parts]),
        )

    def packed(self, out_in: bool = False) -> dict[str, np.ndarray]:
        """The artifact's tensors (see the module docstring), ``[in, out]`` oriented, or ``[out, in]`` with
        ``out_in``."""
        fmt = self.fmt
        out_features, in_features = self.codes.shape
        codes = self.codes.astype(np.uint32).reshape(out_features, in_features // fmt.codes_per_word, -1)
        shifts = np.arange(fmt.codes_per_word, dtype=np.uint32) * fmt.bits
        words = np.bitwise_or.reduce(codes << shifts, axis=2).astype(np.uint32)  # [out, in / per word]
        orient = (lambda a: a) if out_in else (lambda a: a.T)  # noqa: E731
        tensors = {
            "codes": np.ascontiguousarray(orient(words)),
            "scale": np.ascontiguousarray(orient(self.scale), dtype=fmt.scale_dtype),
        }
        if self.min is not None:
            tensors["min"] = np.ascontiguousarray(orient(self.min), dtype=fmt.scale_dtype)
        return tensors


def quantize(w: np.ndarray, fmt: GroupFormat) -> QuantizedWeight:
    """Symmetric group quantization of a float ``[out, in]`` weight (MLC-LLM's ``group_quantize``)."""
    if fmt.has_min:
        raise ValueError(f"{fmt.name} is kept from GGUF files, not produced")
    out_features, in_features = w.shape
    groups = w.astype(np.float32).reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    scale = (np.abs(groups).max(axis=2) / fmt.max_magnitude).astype(fmt.scale_dtype)
    divisor = np.where(scale == 0, 1, scale.astype(np.float32))[:, :, None]
    q = np.clip(np.rint(groups / divisor), -fmt.max_magnitude, fmt.max_magnitude) + fmt.zero
    return QuantizedWeight(fmt, q.astype(np.uint8).reshape(out_features, in_features), scale)


def _weight(fmt: GroupFormat, out_in: bool, c, s, m: tuple):
    """``w(k, n)``: weight ``[k, n]`` (input ``k``, output ``n``) in float32, read from the te tensors of a
    quantized linear (codes ``c``, scales ``s``, and ``m`` holding the mins if the format has them)."""
    from tvm import tirx

    per_word, mask = fmt.codes_per_word, (1 << fmt.bits) - 1
    at = (lambda a, i, n: a[n, i]) if out_in else (lambda a, i, n: a[i, n])  # noqa: E731

    def w(k, n):
        shift = tirx.Cast(CODE_DTYPE, (k % per_word) * fmt.bits)
        code = (at(c, k // per_word, n) >> shift) & tirx.const(mask, CODE_DTYPE)
        value = at(s, k // GROUP_SIZE, n).astype("float32") * (code.astype("float32") - float(fmt.zero))
        return value + at(m[0], k // GROUP_SIZE, n).astype("float32") if m else value

    return w


def dequantize(codes, scale, min_, fmt: GroupFormat, dtype: str, out_in: bool = False):
    """The ``[in, out]`` weight in ``dtype`` (``[out, in]`` with ``out_in``), from a quantized linear's
    tensors (``nn`` Tensors); computed in float32 (exact for the GGUF formats), fused into its matmul."""
    from tvm import te
    from tvm.relax.frontend.nn import op

    per_word = fmt.codes_per_word

    def compute(c: te.Tensor, s: te.Tensor, *m: te.Tensor) -> te.Tensor:
        w = _weight(fmt, out_in, c, s, m)
        if out_in:
            shape = (c.shape[0], c.shape[1] * per_word)
            return te.compute(shape, lambda n, k: w(k, n).astype(dtype), name="dequantize")
        shape = (c.shape[0] * per_word, c.shape[1])
        return te.compute(shape, lambda k, n: w(k, n).astype(dtype), name="dequantize")

    args = [codes, scale] + ([min_] if min_ is not None else [])
    return op.tensor_expr_op(compute, "dequantize", args=args)


def dequantize_columns(codes, scale, min_, columns, fmt: GroupFormat, dtype: str, out_in: bool = False):
    """``W[:, columns].T`` in ``dtype``, ``[len(columns), in]``: the rows of the embedding table that a tied
    lm_head stores. ``columns`` (int32) are clamped into range, as ``take``'s "clip" mode does."""
    from tvm import te, tirx
    from tvm.relax.frontend.nn import op

    per_word = fmt.codes_per_word

    def compute(c: te.Tensor, s: te.Tensor, cols: te.Tensor, *m: te.Tensor) -> te.Tensor:
        w = _weight(fmt, out_in, c, s, m)
        words, outputs = (c.shape[1], c.shape[0]) if out_in else (c.shape[0], c.shape[1])

        def row(t, k):
            n = tirx.max(tirx.min(cols[t].astype("int64"), outputs - 1), 0)
            return w(k, n).astype(dtype)

        return te.compute((cols.shape[0], words * per_word), row, name="dequantize_columns")

    args = [codes, scale, columns] + ([min_] if min_ is not None else [])
    return op.tensor_expr_op(compute, "dequantize_columns", args=args)
