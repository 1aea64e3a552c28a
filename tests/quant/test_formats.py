"""Element formats: our bytes against gguf-py (ggml's reference), native against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants

from edgeai.native_bridge import native
from edgeai.quant.formats import FORMATS, dequantize, format_by_name, quantize, round_half_away
from edgeai.errors import OptionError


def _adversarial(rng) -> dict[str, np.ndarray]:
    """Data that breaks careless quantizers: zeros, ties, huge and tiny values, subnormals, sign flips."""
    n = 32 * 64
    cases = {
        "normal": rng.standard_normal(n).astype(np.float32),
        "large": (rng.standard_normal(n) * 6e4).astype(np.float32),
        "tiny": (rng.standard_normal(n) * 1e-30).astype(np.float32),
        "zeros": np.zeros(n, np.float32),
        "ties": np.tile(np.arange(-16, 16, dtype=np.float32) + 0.5, n // 32),
        "one_outlier": np.where(np.arange(n) % 32 == 5, 1000.0, rng.standard_normal(n)).astype(np.float32),
        "f16_subnormal": (rng.standard_normal(n) * 1e-6).astype(np.float32),
        "f16_overflow": np.array([65504, 65519, 65520, -65536, 1e10, -1e-8] * (n // 6) + [0.0] * (n % 6), np.float32),
        "all_negative": -np.abs(rng.standard_normal(n)).astype(np.float32),
    }
    return cases


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # gguf-py on the f16_overflow case
@pytest.mark.parametrize("name", ["f16", "bf16", "q8_0"])
def test_bytes_identical_to_gguf_py(name):
    fmt = FORMATS[name]
    for case, data in _adversarial(np.random.default_rng(0)).items():
        ours = quantize(data, fmt)  # native path
        numpy_ref = fmt.quantize_blocks(data.reshape(-1, fmt.block_size)).reshape(-1)
        theirs = quants.quantize(data.reshape(-1, 32 * 8), fmt.ggml_type).reshape(-1)
        assert ours.tobytes() == theirs.tobytes(), f"{name}/{case}: native differs from gguf-py"
        assert numpy_ref.tobytes() == theirs.tobytes(), f"{name}/{case}: numpy reference differs from gguf-py"


@pytest.mark.parametrize("name", list(FORMATS))
def test_decode_matches_gguf_py(name):
    fmt = FORMATS[name]
    data = np.random.default_rng(1).standard_normal(32 * 40).astype(np.float32)
    raw = quantize(data, fmt)
    ours = dequantize(raw, fmt)
    theirs = quants.dequantize(raw.reshape(1, -1), fmt.ggml_type).reshape(-1)
    np.testing.assert_array_equal(ours, theirs)


def test_native_q8_0_decode_matches_numpy():
    data = np.random.default_rng(2).standard_normal(32 * 1001).astype(np.float32) * 3
    raw = quantize(data, FORMATS["q8_0"])
    out = np.empty(data.size, np.float32)
    native.dequantize_q8_0(raw, out, 2)
    np.testing.assert_array_equal(out, dequantize(raw, FORMATS["q8_0"]))


@pytest.mark.parametrize("name,bound", [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 8e-3)])
def test_round_trip_error_bounds(name, bound):
    """Relative error of one encode/decode on unit-scale data stays within the format's precision."""
    data = np.random.default_rng(3).standard_normal(32 * 500).astype(np.float32)
    err = np.abs(dequantize(quantize(data, FORMATS[name]), FORMATS[name]) - data)
    scale = np.abs(data).reshape(-1, 32).max(axis=1).repeat(32)
    assert (err / scale).max() < bound


def test_thread_counts_agree():
    data = np.random.default_rng(4).standard_normal(32 * 100_003).astype(np.float32)
    outs = []
    for threads in (1, 2, 7):
        out = np.empty(FORMATS["q8_0"].nbytes(data.size), np.uint8)
        native.quantize_q8_0(data, out, threads)
        outs.append(out.tobytes())
    assert outs[0] == outs[1] == outs[2]


def test_round_half_away_is_exact_below_one_half():
    x = np.array([0.49999997, -0.49999997, 0.5, -0.5, 1.5, 2.5, -2.5], np.float32)
    np.testing.assert_array_equal(round_half_away(x), np.array([0, 0, 1, -1, 2, 3, -3], np.float32))


def test_native_rejects_bad_lengths():
    with pytest.raises(ValueError, match="multiple of the block size"):
        native.quantize_q8_0(np.zeros(33, np.float32), np.zeros(34, np.uint8), 1)
    with pytest.raises(ValueError, match="expected"):
        native.quantize_q8_0(np.zeros(32, np.float32), np.zeros(35, np.uint8), 1)


def test_unknown_type_lists_known_ones():
    with pytest.raises(OptionError, match="q8_0"):
        format_by_name("q3_z")
