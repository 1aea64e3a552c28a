"""Block-wise integer weights as onnxruntime's `MatMulNBits` / `GatherBlockQuantized` store them.

    w [N, K] float  ->  codes uint8 [N, K/block, block*bits/8]   (4 bits: two per byte, low nibble first)
                        scales float32 [N, K/block]
    w[n, k] ~= (code[n, k] - 2^(bits-1)) * scale[n, k // block]     (symmetric: the default zero point)

With 32-wide blocks these are exactly GGUF's Q4_0 and Q8_0 (`q = code - 8`, `q = code - 128`), so
the converter quantizes with the shared block quantizer (`edgeai.quant.formats.quantize`: importance-
weighted scale search, the C++ core) or takes GPTQ's Q4_0/Q8_0 bytes, and only re-lays the bytes out
here (`from_gguf_blocks`). Other block sizes (64, 128) have no GGUF type: `encode` searches their
scales in numpy the way the C++ core does for Q4_0 (least importance-weighted squared error over a
grid of candidate scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeai.errors import OptionError

BLOCK_SIZES = (32, 64, 128)
BITS = (4, 8)
# GGUF block type with the same grid, for 32-wide blocks
GGUF_TYPE = {4: "q4_0", 8: "q8_0"}


@dataclass(frozen=True)
class NBits:
    """One weight matrix in MatMulNBits layout."""

    codes: np.ndarray  # [N, K/block, block*bits/8] uint8
    scales: np.ndarray  # [N, K/block] float32
    bits: int
    block_size: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def dequantize(self) -> np.ndarray:
        """The float32 weights [N, K] these codes stand for."""
        codes = unpack(self.codes, self.bits).astype(np.float32) - float(1 << (self.bits - 1))  # [N, kb, block]
        return (codes * self.scales[:, :, None]).reshape(self.codes.shape[0], -1)


def check(bits: int, block_size: int, k: int, name: str) -> None:
    """OptionError unless a row of `k` weights of tensor `name` fills whole blocks."""
    if bits not in BITS:
        raise OptionError(f"{bits}-bit weights are not supported; MatMulNBits here takes {BITS}")
    if block_size not in BLOCK_SIZES:
        raise OptionError(f"--block-size {block_size} is not supported; choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if k % block_size:
        raise OptionError(
            f"--block-size {block_size} does not divide the row length {k} of {name}; "
            f"choose a block size that divides it ({', '.join(str(b) for b in BLOCK_SIZES if k % b == 0) or 'none does'})"
        )


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., block] (0 .. 2^bits-1) -> bytes [..., block*bits/8], low nibble first for 4 bits."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack`: [..., block*bits/8] -> [..., block] uint8."""
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def from_gguf_blocks(raw: np.ndarray, bits: int, n: int, k: int) -> NBits:
    """Re-lay GGUF Q4_0 / Q8_0 bytes of an [n, k] matrix as MatMulNBits (block 32); exact."""
    kb = k // 32
    if bits == 4:
        blocks = raw.reshape(n, kb, 18)
        d = blocks[:, :, :2].copy().view(np.float16)[..., 0]  # [n, kb]
        qs = blocks[:, :, 2:]  # [n, kb, 16]: low nibbles are elements 0..15, high ones 16..31
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [n, kb, 32], q + 8
    else:
        blocks = raw.reshape(n, kb, 34)
        d = blocks[:, :, :2].copy().view(np.float16)[..., 0]
        codes = (blocks[:, :, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # [n, kb, 32], q + 128
    return NBits(np.ascontiguousarray(pack(codes, bits)), d.astype(np.float32), bits, 32)


def encode(w: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None) -> NBits:
    """Symmetric block quantization of w [N, K] with scales searched for the least squared error
    weighted by `importance` ([K], e.g. the imatrix statistic; None: uniform).

    Candidates are ggml's: d = -max/(nmax + 0.1*t) for t in -9..9 (max the signed value of largest
    magnitude, nmax = 2^(bits-1)), each refined once by the weighted least-squares scale of its codes.
    """
    n, k = w.shape
    nmax = float(1 << (bits - 1))
    x = w.reshape(n, k // block_size, block_size).astype(np.float32)  # [N, kb, block]
    imp = np.ones(k, np.float32) if importance is None else np.maximum(importance.astype(np.float32), 0) + 1e-12
    imp = np.broadcast_to(imp.reshape(1, k // block_size, block_size), x.shape)
    arg = np.abs(x).argmax(axis=-1)[..., None]
    signed_max = np.take_along_axis(x, arg, axis=-1)[..., 0]  # [N, kb]
    best_err = np.full(signed_max.shape, np.inf, np.float32)
    best_d = np.zeros_like(signed_max)
    for t in range(-9, 10):
        d = -signed_max / (nmax + 0.1 * t)  # [N, kb]
        for _ in range(2):  # the candidate, then its least-squares refinement
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.clip(np.rint(np.where(d[..., None] != 0, x / d[..., None], 0)), -nmax, nmax - 1)
            err = (imp * np.square(x - q * d[..., None])).sum(axis=-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d = np.where(better, d, best_d)
            sum_qx, sum_qq = (imp * q * x).sum(axis=-1), (imp * q * q).sum(axis=-1)
            d = np.where(sum_qq > 0, sum_qx / np.where(sum_qq > 0, sum_qq, 1), d)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(np.where(best_d[..., None] != 0, x / best_d[..., None], 0)), -nmax, nmax - 1)
    codes = (q + nmax).astype(np.uint8)
    return NBits(np.ascontiguousarray(pack(codes, bits)), best_d.astype(np.float32), bits, block_size)
