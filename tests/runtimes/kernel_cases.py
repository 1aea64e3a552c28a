"""Kernel test cases from the numpy reference in `quant/`: weights quantized by quant.formats,
decoded by its dequantizer, and the exact float64 product with the activations. The same cases
check the kernel sets of this CPU through the Python module and, written to a file, the AArch64
kernel sets under qemu (tests/runtimes/test_kernels_aarch64.py)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeai.quant.formats import FORMATS, dequantize, quantize

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "mxfp4"]


@dataclass
class Case:
    fmt: str
    ggml_type: int
    rows: np.ndarray  # uint8, n_rows * row_bytes
    x: np.ndarray  # float32 [n]
    n_rows: int
    expected: np.ndarray  # float64 [n_rows]: dequantized weights @ x
    tolerance: np.ndarray  # float64 [n_rows]
    weights: np.ndarray  # float64 [n_rows, n]: the dequantized weights (for products with other activations)


def tolerance(w: np.ndarray, x: np.ndarray, quantized_activations: bool) -> np.ndarray:
    """Per row: float rounding, plus for int8 activations the worst case of rounding each one by
    half a step (amax of its 32-block / 254) times the weights it meets."""
    mag = np.abs(w) @ np.abs(x.astype(np.float64))
    tol = 1e-5 * mag + 1e-6
    if quantized_activations:
        step = np.repeat(np.abs(x.reshape(-1, 32)).max(axis=1) / 254.0, 32)
        tol = tol + 1.001 * (np.abs(w) @ step)
    return tol


def make_cases(seed: int = 0) -> list[Case]:
    """Random and adversarial cases for every type: several row lengths (one block, odd numbers
    of blocks), magnitudes from 1e-3 to 1e4, outlier activations, zero rows and constant rows."""
    rng = np.random.default_rng(seed)
    cases = []
    for name in TYPES:
        fmt = FORMATS[name]
        block = max(fmt.block_size, 32)
        for n_blocks, scale in ((1, 1.0), (3, 1e-3), (5, 1e3), (2, 1.0)):
            n, n_rows = block * n_blocks, 11  # an 8-row group, two 4-row tiles, odd rows left over
            w = rng.standard_normal((n_rows, n)).astype(np.float32) * np.float32(scale)
            w[1] = 0.0  # a zero row
            w[2] = np.float32(scale)  # a constant row
            w[3, :: max(1, n // 7)] *= 30  # weight outliers
            w = np.clip(w, -6e4, 6e4)  # within f16's range (65504): F16 weights and the f16 block scales and mins
            x = rng.standard_normal(n).astype(np.float32)
            x[rng.integers(0, n, 3)] *= 100  # activation outliers, as LLM hidden states have
            if n_blocks == 2:
                x[:32] = 0.0  # an all-zero activation block
            raw = np.ascontiguousarray(quantize(w, fmt)).view(np.uint8).ravel()
            wd = dequantize(raw, fmt).reshape(n_rows, n).astype(np.float64)
            expected = wd @ x.astype(np.float64)
            cases.append(Case(name, int(fmt.ggml_type), raw, x, n_rows, expected,
                              tolerance(wd, x, quantized_activations=name not in ("f32", "f16", "bf16")), wd))
    return cases


def write_cases(cases: list[Case], path: Path) -> None:
    """Binary file for the C++ self-tests (native/tests/kernel_checks.hpp reads it): u32 count and
    u32 0 (padding), then per case u32 ggml_type, n_rows, n, row_bytes_total, the rows' bytes
    zero-padded to a multiple of 8, x float32[n], expected float64[n_rows], tolerance float64[n_rows]."""
    with open(path, "wb") as f:
        f.write(struct.pack("<II", len(cases), 0))
        for c in cases:
            f.write(struct.pack("<IIII", c.ggml_type, c.n_rows, c.x.size, c.rows.size))
            f.write(c.rows.tobytes() + bytes(-c.rows.size % 8))
            f.write(c.x.astype("<f4").tobytes())
            f.write(c.expected.astype("<f8").tobytes())
            f.write(c.tolerance.astype("<f8").tobytes())
