"""Tokenizers and chat templates written into GGUF, checked by tokenizing in llama.cpp."""

from __future__ import annotations

import json

import pytest

import edgeai
from helpers import CHAT_TEMPLATE, TINY_ARCHS, VARIED_TEXT, llama_cpp_model, make_tiny_checkpoint
from gguf import GGUFReader


def _hf_tokens(folder, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok(text, add_special_tokens=False)["input_ids"]


# one checkpoint per tokenizer kind: SentencePiece, and byte-level BPE with each pre-tokenizer
KINDS = {"spm": "llama", "llama3": "llama3", "smollm": "smollm", "qwen2": "qwen2", "gpt2": "olmoe"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    by_name = {a.name: a for a in TINY_ARCHS}
    return {kind: make_tiny_checkpoint(root / kind, by_name[arch]) for kind, arch in KINDS.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_tokenization_matches_hf(kind, checkpoints, tmp_path):
    folder = checkpoints[kind]
    out = edgeai.convert(folder, tmp_path / "m.gguf", outtype="f16")
    llm = llama_cpp_model(out, n_ctx=64)
    ours = llm.tokenize(VARIED_TEXT.encode(), add_bos=False, special=True)
    assert ours == _hf_tokens(folder, VARIED_TEXT)
    text = llm.detokenize(ours, special=True).decode()
    if kind == "spm":  # SentencePiece's dummy prefix: llama_detokenize keeps the leading space
        text = text.removeprefix(" ")
    assert text == VARIED_TEXT


@pytest.mark.parametrize("kind", list(KINDS))
def test_metadata_written_as_llama_cpp_reads_it(kind, checkpoints, tmp_path):
    out = edgeai.convert(checkpoints[kind], tmp_path / "m.gguf", outtype="f16")
    fields = GGUFReader(out).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == ("llama" if kind == "spm" else "gpt2")
    expected_pre = {"spm": "default", "llama3": "llama-bpe", "smollm": "smollm", "qwen2": "qwen2", "gpt2": "gpt-2"}
    assert value("tokenizer.ggml.pre") == expected_pre[kind]
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    tokens = value("tokenizer.ggml.tokens")
    assert tokens[value("tokenizer.ggml.eos_token_id")] in ("<|im_end|>", "</s>")
    if kind == "spm":
        assert len(value("tokenizer.ggml.scores")) == len(tokens)
    else:
        assert len(value("tokenizer.ggml.merges")) > 0
    recipe = json.loads(value("edgeai.recipe"))
    assert recipe["tool"] == "edgeai" and recipe["recipe"] == "f16" and recipe["method"] == "rtn"
    assert recipe["tensor_types"]["blk.0.attn_norm.weight"] == "f32"


def test_chat_template_renders_in_llama_cpp(checkpoints, tmp_path):
    """llama.cpp applies the template stored in the file (llama_chat_apply_template)."""
    out = edgeai.convert(checkpoints["qwen2"], tmp_path / "m.gguf", outtype="f16")
    llm = llama_cpp_model(out, n_ctx=64)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    prompt = formatter(messages=[{"role": "user", "content": "hi"}]).prompt
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_post_processor_decides_add_bos_and_eos():
    """Without add_bos_token in tokenizer_config.json, tokenizer.json's template says (Llama 3 style)."""
    from edgeai.converters.tokenizer import post_processor_adds

    bos_first = {"post_processor": {"type": "Sequence", "processors": [
        {"type": "ByteLevel"},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>"}},
                                                  {"Sequence": {"id": "A"}}]},
    ]}}
    assert post_processor_adds(bos_first, "bos") is True and post_processor_adds(bos_first, "eos") is False
    eos_last = {"post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A"}},
                                                                              {"SpecialToken": {"id": "</s>"}}]}}
    assert post_processor_adds(eos_last, "bos") is False and post_processor_adds(eos_last, "eos") is True
    assert post_processor_adds({"post_processor": None}, "bos") is None
