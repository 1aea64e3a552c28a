"""MXFP4 blocks against ggml itself: the bytes of ggml's quantize_row_mxfp4_ref and the floats of its
dequantize_row_mxfp4, called in the libggml-base that llama-cpp-python ships, and gguf-py's codec."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import quants

from edgeai.quant.blocks import E2M1_DOUBLED, e8m0_half
from edgeai.quant.formats import FORMATS, dequantize, quantize

MXFP4 = FORMATS["mxfp4"]


@pytest.fixture(scope="module")
def ggml():
    """ggml's reference MXFP4 codec (C, from llama-cpp-python's libggml-base)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.skip("llama-cpp-python is not installed")
    lib = ctypes.CDLL(str(Path(spec.origin).parent / "lib" / "libggml-base.so"))
    lib.quantize_row_mxfp4_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.dequantize_row_mxfp4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def encode(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
        out = np.zeros(x.size // 32 * 17, np.uint8)
        lib.quantize_row_mxfp4_ref(x.ctypes.data, out.ctypes.data, x.size)
        return out

    def decode(raw: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(raw, np.uint8)
        out = np.zeros(raw.size // 17 * 32, np.float32)
        lib.dequantize_row_mxfp4(raw.ctypes.data, out.ctypes.data, out.size)
        return out

    return encode, decode


def _cases(rng) -> dict[str, np.ndarray]:
    n = 32 * 2048
    # largest magnitudes whose mantissa is all ones or nearly: float32 log2 rounds up to the next
    # integer there, and so does ggml's exponent
    near_pow2 = (np.arange(1, 254, dtype=np.uint32)[:, None] << 23 | np.arange(0x7FFFFF - 7, 0x800000, dtype=np.uint32)).ravel()
    spiky = np.zeros((near_pow2.size, 32), np.float32)
    spiky[:, 3] = near_pow2.view(np.float32)
    spiky[:, 4:] = spiky[:, 3:4] * rng.uniform(-1, 1, (near_pow2.size, 28)).astype(np.float32)
    return {
        "normal": rng.standard_normal(n),
        "block_scales": rng.standard_normal(n) * 2.0 ** rng.integers(-120, 120, n // 32).repeat(32),
        "ties": np.tile(np.arange(-16, 16, 0.25), n // 128),  # halfway between table entries
        "near_powers_of_two": spiky,
        "tiny": rng.standard_normal(n) * 1e-40,  # amax below 2^-125: ggml's exponent byte wraps
        "specials": np.tile([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38, 1e-45, 1.5], n // 8),
        "all_nan": np.full(64, np.nan),
        "zeros": np.zeros(64),
    }


def test_bytes_and_values_identical_to_ggml(ggml):
    encode, decode = ggml
    for case, x in _cases(np.random.default_rng(0)).items():
        x = np.asarray(x, np.float32).reshape(-1)
        with np.errstate(all="ignore"):
            ours = quantize(x, MXFP4)
        theirs = encode(x)
        assert ours.tobytes() == theirs.tobytes(), f"{case}: {np.flatnonzero(ours != theirs)[:5]}"
        np.testing.assert_array_equal(dequantize(ours, MXFP4), decode(theirs), err_msg=case)


def test_every_exponent_and_code_decodes_as_ggml(ggml):
    _, decode = ggml
    raw = np.zeros((256, 17), np.uint8)
    raw[:, 0] = np.arange(256)  # every exponent byte (255: 12 * 2^127 is inf, in ggml too)
    raw[:, 1:] = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)  # weight j: code j, j+16: 15-j
    ours = dequantize(raw.reshape(-1), MXFP4)
    np.testing.assert_array_equal(ours, decode(raw.reshape(-1)))
    # e = 128: the scale 2^(e-128) is 1, so the weights are the doubled E2M1 table itself
    table = E2M1_DOUBLED.astype(np.float32)
    np.testing.assert_array_equal(ours.reshape(256, 32)[128], np.concatenate([table, table[::-1]]))
    assert e8m0_half(np.array([0, 1, 2, 127, 254], np.uint8)).tolist() == [2.0 ** -128, 2.0 ** -127, 2.0 ** -126, 0.5, 2.0 ** 126]


def test_identical_to_gguf_py():
    for case, x in _cases(np.random.default_rng(1)).items():
        x = np.asarray(x, np.float32).reshape(-1, 256 if np.asarray(x).size % 256 == 0 else 32)
        with np.errstate(all="ignore"):
            ours, theirs = quantize(x, MXFP4), quants.quantize(x, MXFP4.ggml_type)
        assert ours.tobytes() == theirs.tobytes(), case
        np.testing.assert_array_equal(dequantize(ours, MXFP4), quants.dequantize(theirs, MXFP4.ggml_type).reshape(-1), err_msg=case)


def test_round_trip_error():
    """4-bit floats on N(0, 1) rows: RMS error about a tenth of the data's (Q4_0's is 0.16 at the same bits)."""
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    rms = np.sqrt(np.mean((dequantize(quantize(x, MXFP4), MXFP4) - x.reshape(-1)) ** 2))
    assert MXFP4.bits_per_weight == 4.25
    assert rms < 0.16


def test_openai_blocks_repack_to_the_values_transformers_decodes():
    """OpenAI's MXFP4 layout (gpt-oss checkpoints: element 2i low and 2i+1 high in byte i, the E8M0
    bytes apart) moved into ggml's block_mxfp4 without re-encoding: every byte and every exponent
    0..255 decodes to what transformers' own dequantizer gives, and the move inverts exactly."""
    torch = pytest.importorskip("torch")
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    from edgeai.quant.blocks import mxfp4_from_openai, mxfp4_to_openai

    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (2, 256, 3, 16), dtype=np.uint8)
    blocks[0, :, 0] = np.arange(256, dtype=np.uint8)[:, None]  # every byte in every position
    scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (2, 256, 3)).copy()  # every exponent
    ggml = mxfp4_from_openai(blocks, scales)
    ours = dequantize(ggml, MXFP4).reshape(2, 256, 96)
    theirs = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                              dtype=torch.float32).numpy()  # [2, 96, 256]: in before out
    np.testing.assert_array_equal(ours, theirs.transpose(0, 2, 1))
    back_blocks, back_scales = mxfp4_to_openai(ggml)
    np.testing.assert_array_equal(back_blocks, blocks)
    np.testing.assert_array_equal(back_scales, scales)
