"""Q8_0 files: byte-identical to gguf-py's quantizer, loaded and run by llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, quants

import edgeai
from helpers import TINY_ARCHS, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_q8_0_bytes_match_gguf_py_and_run(arch, tmp_path):
    folder = make_tiny_checkpoint(tmp_path / arch, ARCHS[arch])
    f32 = edgeai.convert(folder, tmp_path / "f32.gguf", outtype="f32")
    q8 = edgeai.convert(folder, tmp_path / "q8.gguf", outtype="q8_0")
    reference = {t.name: t for t in GGUFReader(f32).tensors}
    n_q8 = 0
    for t in GGUFReader(q8).tensors:
        src = np.asarray(reference[t.name].data, dtype=np.float32)
        if src.ndim == 1 or "gate_inp" in t.name:  # norms, biases, routers stay F32
            assert t.tensor_type == GGMLQuantizationType.F32, t.name
        elif src.shape[-1] % 32:  # rows that do not fill Q8_0 blocks (the shared expert's 48)
            assert t.tensor_type == GGMLQuantizationType.F16, t.name
        else:
            assert t.tensor_type == GGMLQuantizationType.Q8_0, t.name
            n_q8 += 1
            expected = quants.quantize(src, GGMLQuantizationType.Q8_0)
            assert bytes(t.data) == expected.tobytes(), t.name
    assert n_q8 > 0

    tokens = list(range(3, 43))
    a = llama_cpp_logits(llama_cpp_model(f32), tokens)
    b = llama_cpp_logits(llama_cpp_model(q8), tokens)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert len(llama_cpp_greedy(llama_cpp_model(q8), tokens, 8)) == 8


def test_row_length_not_a_block_multiple_falls_back_to_f16(tmp_path):
    """hidden_size 72 is not a multiple of 32: llama.cpp's own rule is to keep such rows in F16."""
    folder = make_tiny_checkpoint(tmp_path / "odd", ARCHS["qwen3"], hidden_size=72, head_dim=18)
    out = edgeai.convert(folder, tmp_path / "q8.gguf", outtype="q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16  # rows of 72
    assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.Q8_0  # rows of 96
    llm = llama_cpp_model(out)
    assert len(llama_cpp_greedy(llm, list(range(3, 20)), 4)) == 4
