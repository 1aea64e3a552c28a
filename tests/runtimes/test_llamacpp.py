"""The llama.cpp backend against llama-cpp-python's own high-level evaluation of the same file."""

from __future__ import annotations

import numpy as np

from edgeai.runtimes.llamacpp import KVType, LlamaCppBackend
from edgeai.runtimes.base import GREEDY
from helpers import VARIED_TEXT, llama_cpp_greedy, llama_cpp_model


import pytest


@pytest.mark.parametrize("N_BATCH", [512, 16])
def test_logits_and_greedy_tokens_equal_llama_cpp(tiny_chat_gguf, N_BATCH):
    be = LlamaCppBackend(tiny_chat_gguf, n_ctx=256, threads=1, kv_type=KVType.F32, n_batch=N_BATCH,
                         flash_attn=False)  # as llama_cpp_model
    ref = llama_cpp_model(tiny_chat_gguf)
    try:
        tokens = be.tokenize(VARIED_TEXT)[:40]
        assert tokens == ref.tokenize(VARIED_TEXT.encode())[:40]
        be.set_sampling(GREEDY)
        first = be.step(tokens)  # three batches of 16, 16 and 8
        ref.reset()
        ref.eval(tokens)
        np.testing.assert_allclose(be.logits(), ref.scores[len(tokens) - 1], rtol=1e-4, atol=1e-4)
        ours = [first]
        for _ in range(9):
            ours.append(be.step([ours[-1]]))
        assert ours == llama_cpp_greedy(ref, tokens, 10)
        assert be.stats().extra["kv_type"] == "f32"
    finally:
        be.close()
        ref.close()
