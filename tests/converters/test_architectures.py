"""Every supported family: tiny checkpoint -> edgeai convert (f32) -> llama.cpp, compared with transformers."""

from __future__ import annotations

import numpy as np
import pytest

import edgeai
from helpers import TINY_ARCHS, hf_logits_and_greedy, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model, make_tiny_checkpoint

PROMPT_LEN = 40
N_GREEDY = 16


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Checkpoints are made once per module; each test converts its own."""
    root = tmp_path_factory.mktemp("tiny")
    return {a.name: make_tiny_checkpoint(root / a.name, a) for a in TINY_ARCHS}


@pytest.mark.parametrize("arch", [a.name for a in TINY_ARCHS])
def test_f32_matches_transformers(arch, tiny_models, tmp_path):
    folder = tiny_models[arch]
    out = edgeai.convert(folder, tmp_path / f"{arch}.gguf", outtype="f32")
    llm = llama_cpp_model(out)
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(3, llm.n_vocab(), PROMPT_LEN)]

    ours = llama_cpp_logits(llm, tokens)
    ref, ref_greedy = hf_logits_and_greedy(folder, tokens, N_GREEDY)
    assert ours.shape == ref.shape
    diff = np.abs(ours[-1] - ref[-1]).max()
    assert diff < 1e-3, f"{arch}: last-position logits differ by {diff}"
    assert np.abs(ours - ref).max() < 1e-3, f"{arch}: logits differ at some position"
    assert llama_cpp_greedy(llm, tokens, N_GREEDY) == ref_greedy
