"""4-6 bit block formats: numpy reference vs C++ core vs gguf-py (ggml's reference) vs the error they make."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants

from edgeai.native_bridge import native
from edgeai.quant.formats import FORMATS, Fit, dequantize, quantize

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1"]
KQUANTS = ["q4_k", "q5_k", "q6_k"]
IQUANTS = ["iq4_nl", "iq4_xs"]  # gguf-py decodes these but has no encoder: checked against our numpy reference


def _cases(rng) -> dict[str, np.ndarray]:
    """[rows, 512] float32 matrices, regular and adversarial."""
    shape = (16, 512)
    return {
        "normal": rng.standard_normal(shape).astype(np.float32),
        "row_scales": (rng.standard_normal(shape) * rng.uniform(1e-3, 30, (16, 1))).astype(np.float32),
        "outliers": np.where(rng.random(shape) < 0.01, 50.0, rng.standard_normal(shape)).astype(np.float32),
        "zeros": np.zeros(shape, np.float32),
        "constant": np.full(shape, 0.37, np.float32),
        "positive": np.abs(rng.standard_normal(shape)).astype(np.float32) + 1.0,
        "tiny": (rng.standard_normal(shape) * 1e-6).astype(np.float32),
        "ties": np.tile(np.arange(-8, 8, 0.5, dtype=np.float32), (16, 16)),
    }


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_rtn_bytes_identical_to_gguf_py(name):
    fmt = FORMATS[name]
    for case, x in _cases(np.random.default_rng(0)).items():
        assert quantize(x, fmt).tobytes() == quants.quantize(x, fmt.ggml_type).tobytes(), case


@pytest.mark.parametrize("name", LEGACY + KQUANTS + IQUANTS)
def test_native_rtn_identical_to_numpy_reference(name):
    fmt = FORMATS[name]
    for case, x in _cases(np.random.default_rng(1)).items():
        ours = quantize(x, fmt)
        reference = fmt.quantize_blocks(x.reshape(-1, fmt.block_size)).reshape(-1)
        assert ours.tobytes() == reference.tobytes(), case


@pytest.mark.parametrize("fit", [Fit.RTN, Fit.SEARCH])
@pytest.mark.parametrize("name", LEGACY + KQUANTS + IQUANTS)
def test_decoders_agree_with_gguf_py(name, fit):
    """Our numpy decoder, our C++ decoder and gguf-py's read the same values from the same bytes."""
    fmt = FORMATS[name]
    for case, x in _cases(np.random.default_rng(2)).items():
        raw = quantize(x, fmt, fit=fit)
        ours = dequantize(raw, fmt)
        theirs = quants.dequantize(raw.reshape(x.shape[0], -1), fmt.ggml_type).reshape(-1)
        np.testing.assert_array_equal(ours, theirs, err_msg=case)
        cpp = np.empty(x.size, np.float32)
        native.dequantize(getattr(native.BlockType, name.upper()), raw, cpp, 2)
        np.testing.assert_array_equal(cpp, ours, err_msg=case)


# Largest RMS error / RMS of the data on N(0, 1) rows, per format (RTN and SEARCH).
ERROR_BOUNDS = {"q4_0": 0.16, "q4_1": 0.14, "q5_0": 0.08, "q5_1": 0.07, "q4_k": 0.14, "q5_k": 0.07, "q6_k": 0.035,
                "iq4_nl": 0.14, "iq4_xs": 0.14}


@pytest.mark.parametrize("name", LEGACY + KQUANTS + IQUANTS)
def test_round_trip_error_bounds_and_search_is_better(name):
    fmt = FORMATS[name]
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    rms = lambda raw: float(np.sqrt(np.mean((dequantize(raw, fmt) - x.reshape(-1)) ** 2)))  # noqa: E731
    rtn, search = rms(quantize(x, fmt)), rms(quantize(x, fmt, fit=Fit.SEARCH))
    assert rtn < ERROR_BOUNDS[name]
    assert search < rtn * 0.97, f"search {search} not clearly better than RTN {rtn}"


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q6_k", "iq4_nl", "iq4_xs"])
def test_importance_moves_error_to_unimportant_columns(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    importance = np.where(np.arange(512) % 4 == 0, 100.0, 1.0).astype(np.float32)
    err = lambda raw: (dequantize(raw, fmt).reshape(x.shape) - x) ** 2  # noqa: E731
    plain = err(quantize(x, fmt, fit=Fit.SEARCH))
    weighted = err(quantize(x, fmt, fit=Fit.SEARCH, importance=importance))
    assert (weighted * importance).sum() < (plain * importance).sum()


def test_threads_give_identical_bytes():
    x = np.random.default_rng(5).standard_normal((301, 256)).astype(np.float32)
    imp = np.random.default_rng(6).uniform(0.1, 2, 256).astype(np.float32)
    outs = {t: quantize(x, FORMATS["q4_k"], fit=Fit.SEARCH, importance=imp, n_threads=t).tobytes() for t in (1, 2, 5)}
    assert outs[1] == outs[2] == outs[5]


def test_importance_length_checked():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="importance: expected 256"):
        quantize(x, FORMATS["q4_k"], fit=Fit.SEARCH, importance=np.ones(255, np.float32))


def test_iq4_nl_beats_q4_0_at_the_same_size():
    """The non-uniform grid fits normal weights better than Q4_0's uniform one (both 4.5 bits)."""
    x = np.random.default_rng(7).standard_normal((64, 1024)).astype(np.float32)
    mse = lambda name: float(np.mean((dequantize(quantize(x, FORMATS[name], fit=Fit.SEARCH), FORMATS[name]) - x.reshape(-1)) ** 2))  # noqa: E731
    assert FORMATS["iq4_nl"].bits_per_weight == FORMATS["q4_0"].bits_per_weight
    assert mse("iq4_nl") < 0.9 * mse("q4_0") and mse("iq4_xs") < mse("q4_0")
