"""Tensor element formats as data.

Each format is ``(block_size, type_size)`` plus pure numpy ``quantize_blocks`` /
``dequantize_blocks`` working on ``(n_blocks, block_size)`` float32 arrays and
``(n_blocks, type_size)`` uint8 arrays. The numpy functions are the reference: the C++ fast path
(``edgeai._native``) is tested against them bit for bit, and they are tested against gguf-py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from edgeai.errors import OptionError
from edgeai.native_bridge import native
from edgeai.quant import blocks as B
from edgeai.quant.blocks import round_half_away

Fit = native.Fit  # RTN (closed form) or SEARCH (importance-weighted least squares)


def _f32_quantize(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype(np.float32, copy=False).view(np.uint8)


def _f32_dequantize(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32)


def _f16_quantize(blocks: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond 65504 is inf in F16, as in ggml
        return blocks.astype(np.float16).view(np.uint8)


def _f16_dequantize(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _bf16_quantize(blocks: np.ndarray) -> np.ndarray:
    bits = blocks.astype(np.float32, copy=False).view(np.uint32)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    bits = np.where(is_nan, (bits & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), bits)
    rounded = (bits.astype(np.uint64) + (0x7FFF + ((bits >> 16) & 1))) >> 16  # nearest even
    return rounded.astype(np.uint16).view(np.uint8)


def _bf16_dequantize(blocks: np.ndarray) -> np.ndarray:
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _q8_0_quantize(blocks: np.ndarray) -> np.ndarray:
    # (n_blocks, 32) float32 -> (n_blocks, 34) uint8: fp16 scale, then 32 int8
    blocks = blocks.astype(np.float32, copy=False)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    qs = round_half_away(blocks * inv_d).astype(np.int8)
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    return np.concatenate([d16.view(np.uint8), qs.view(np.uint8)], axis=1)


def _q8_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


@dataclass(frozen=True)
class QuantFormat:
    """One GGUF tensor element format."""

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int  # weights per block
    type_size: int  # bytes per block
    quantize_blocks: Callable[[np.ndarray], np.ndarray]
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def nbytes(self, n_elements: int) -> int:
        """Bytes that `n_elements` weights take in this format (a multiple of the block size)."""
        assert n_elements % self.block_size == 0
        return n_elements // self.block_size * self.type_size


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("f32", GGMLQuantizationType.F32, 1, 4, _f32_quantize, _f32_dequantize),
        QuantFormat("f16", GGMLQuantizationType.F16, 1, 2, _f16_quantize, _f16_dequantize),
        QuantFormat("bf16", GGMLQuantizationType.BF16, 1, 2, _bf16_quantize, _bf16_dequantize),
        QuantFormat("q8_0", GGMLQuantizationType.Q8_0, 32, 34, _q8_0_quantize, _q8_0_dequantize),
        QuantFormat("q4_0", GGMLQuantizationType.Q4_0, 32, 18, B.quantize_q4_0, B.dequantize_q4_0),
        QuantFormat("q4_1", GGMLQuantizationType.Q4_1, 32, 20, B.quantize_q4_1, B.dequantize_q4_1),
        QuantFormat("q5_0", GGMLQuantizationType.Q5_0, 32, 22, B.quantize_q5_0, B.dequantize_q5_0),
        QuantFormat("q5_1", GGMLQuantizationType.Q5_1, 32, 24, B.quantize_q5_1, B.dequantize_q5_1),
        QuantFormat("q4_k", GGMLQuantizationType.Q4_K, 256, 144, B.quantize_q4_k, B.dequantize_q4_k),
        QuantFormat("q5_k", GGMLQuantizationType.Q5_K, 256, 176, B.quantize_q5_k, B.dequantize_q5_k),
        QuantFormat("q6_k", GGMLQuantizationType.Q6_K, 256, 210, B.quantize_q6_k, B.dequantize_q6_k),
        QuantFormat("iq4_nl", GGMLQuantizationType.IQ4_NL, 32, 18, B.quantize_iq4_nl, B.dequantize_iq4_nl),
        QuantFormat("iq4_xs", GGMLQuantizationType.IQ4_XS, 256, 136, B.quantize_iq4_xs, B.dequantize_iq4_xs),
        QuantFormat("mxfp4", GGMLQuantizationType.MXFP4, 32, 17, B.quantize_mxfp4, B.dequantize_mxfp4),
    )
}
# formats the C++ block quantizer implements (both fits)
_NATIVE_BLOCK_TYPES = {name: getattr(native.BlockType, name.upper()) for name in ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")}
_BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}


def takes_importance(fmt: QuantFormat) -> bool:
    """Whether `quantize(..., fit=Fit.SEARCH, importance=...)` uses the importance for this format
    (Q8_0, like llama.cpp's, and the float types are encoded the same with or without it)."""
    return fmt.name in _NATIVE_BLOCK_TYPES


def format_by_name(name: str) -> QuantFormat:
    """The format called `name` (case-insensitive); an OptionError lists the known ones."""
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise OptionError(f"unknown tensor type {name!r}; known types: {', '.join(FORMATS)}") from None


def format_of(ggml_type: GGMLQuantizationType) -> QuantFormat | None:
    """Our format for a ggml type, or None where edgeai has none."""
    return _BY_GGML_TYPE.get(GGMLQuantizationType(ggml_type))


def quantize(
    data: np.ndarray,
    fmt: QuantFormat,
    *,
    n_threads: int = 0,
    fit: Fit = Fit.RTN,
    importance: np.ndarray | None = None,
) -> np.ndarray:
    """Encode float data (any shape, last axis a multiple of the block size) as raw uint8 bytes.

    `fit` chooses how block types pick codes and scales: RTN is the closed form (ggml's reference
    for legacy types), SEARCH minimises the squared error weighted by `importance` (one
    non-negative weight per column of the last axis, e.g. an imatrix; None means uniform).
    The native core does the work (threads, GIL released) for every format but F32.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    flat = data.reshape(-1)
    row = data.shape[-1] if data.ndim else 1
    if row % fmt.block_size:
        raise OptionError(f"rows of {row} values do not fill whole {fmt.name} blocks of {fmt.block_size}")
    if fmt.name == "f32":
        return flat.view(np.uint8)
    if fmt.name in ("f16", "bf16"):
        out = np.empty(flat.size, dtype=np.uint16)
        (native.fp32_to_fp16 if fmt.name == "f16" else native.fp32_to_bf16)(flat, out, n_threads)
        return out.view(np.uint8)
    if fmt.name == "q8_0":
        out = np.empty(fmt.nbytes(flat.size), dtype=np.uint8)
        native.quantize_q8_0(flat, out, n_threads)
        return out
    if fmt.name in _NATIVE_BLOCK_TYPES:
        out = np.empty(fmt.nbytes(flat.size), dtype=np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        native.quantize_rows(_NATIVE_BLOCK_TYPES[fmt.name], fit, flat.reshape(-1, row), out, imp, n_threads)
        return out
    return fmt.quantize_blocks(flat.reshape(-1, fmt.block_size)).reshape(-1)


def decode(raw: np.ndarray, fmt: QuantFormat, *, n_threads: int = 0) -> np.ndarray:
    """Decode raw bytes of `fmt` into a flat float32 array with the C++ core where it has the format
    (the same values as `dequantize`, which is the numpy reference), numpy otherwise."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n = raw.size // fmt.type_size * fmt.block_size
    if fmt.name == "q8_0":
        out = np.empty(n, np.float32)
        native.dequantize_q8_0(raw, out, n_threads)
        return out
    if fmt.name in _NATIVE_BLOCK_TYPES:
        out = np.empty(n, np.float32)
        native.dequantize(_NATIVE_BLOCK_TYPES[fmt.name], raw, out, n_threads)
        return out
    return dequantize(raw, fmt)


def dequantize(raw: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """Decode raw bytes of `fmt` into a flat float32 array: the numpy reference (see `decode`)."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    return fmt.dequantize_blocks(raw.reshape(-1, fmt.type_size)).reshape(-1).astype(np.float32, copy=False)
