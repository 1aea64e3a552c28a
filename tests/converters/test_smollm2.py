"""The real bundled model: GGUF -> Hugging Face checkpoint (by transformers) -> edgeai convert -> llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

import edgeai
from edgeai.paths import default_model_path
from helpers import VARIED_TEXT, hf_greedy, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model, smollm2_hf_checkpoint

pytestmark = pytest.mark.slow

PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory):
    return smollm2_hf_checkpoint(tmp_path_factory.mktemp("smollm2-hf"))


@pytest.fixture(scope="module")
def smol_f16(smol_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-gguf") / "smollm2-f16.gguf"
    from typer.testing import CliRunner

    from edgeai.cli import app

    result = CliRunner().invoke(app, ["convert", str(smol_hf), "-o", str(out), "--outtype", "f16", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_tokenization_matches_hf_tokenizer(smol_hf, smol_f16):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smol_hf)
    llm = llama_cpp_model(smol_f16, n_ctx=64)
    for text in (VARIED_TEXT, PROMPT, "   leading spaces", "x" * 300, "1 22 333 4444 55555"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text, add_special_tokens=False)["input_ids"]


def test_greedy_matches_transformers(smol_hf, smol_f16):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(smol_hf)
    tokens = hf_tok(PROMPT, add_special_tokens=False)["input_ids"]
    ref = hf_greedy(AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).eval(), tokens, 32)
    llm = llama_cpp_model(smol_f16, n_ctx=128)
    assert llama_cpp_greedy(llm, tokens, 32) == ref
    assert "Paris" in hf_tok.decode(ref)


def test_gguf_source_reencoded(tmp_path):
    """A GGUF source is dequantized and written again: Q4_1 -> F16 holds exactly the decoded values
    (rounded to F16), keeps every key, and runs in llama.cpp."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    original = default_model_path()
    out = edgeai.convert(original, tmp_path / "f16.gguf", outtype="f16")
    src, dst = GGUFReader(original), GGUFReader(out)
    dst_tensors = {t.name: t for t in dst.tensors}
    assert set(dst_tensors) == {t.name for t in src.tensors}
    for t in src.tensors:
        decoded = dequantize(t.data, t.tensor_type).astype(np.float32)
        written = dequantize(dst_tensors[t.name].data, dst_tensors[t.name].tensor_type)
        expected = decoded if t.name.endswith("norm.weight") else decoded.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(written.reshape(decoded.shape), expected, err_msg=t.name)
    copied = {k for k in src.fields if not k.startswith("GGUF.")} - {"general.file_type"}
    assert copied <= set(dst.fields)
    assert dst.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()

    tokens = llama_cpp_model(original, n_ctx=64).tokenize(PROMPT.encode(), add_bos=False, special=True)
    a = llama_cpp_logits(llama_cpp_model(original, n_ctx=64), tokens)
    b = llama_cpp_logits(llama_cpp_model(out, n_ctx=64), tokens)
    # llama.cpp computes Q4_1 and F16 differently (Q8 vs F16 activations), so only close, not equal
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
