"""The Python fuzz harnesses: each takes one input's bytes and returns, or raises on a bug.

A bad input must end in an `EdgeAIError` (the one error family users see, naming the file and what
is wrong); any other exception, a crash of the process or a broken invariant is a finding. The
harnesses live with the tests because they are test code: tests/fuzz/test_fuzz_replay.py calls each
on its committed corpus (tests/fuzz/corpus/NAME), and benchmarks/fuzz.py runs them under atheris
(coverage-guided, libFuzzer's engine) for the long runs.

    safetensors    converters.sources.SafetensorsCheckpoint over one model.safetensors
    gguf_metadata  the GGUF metadata the converter and the runtimes trust: the re-encoding plan
                   (gguf-py's reader), the native engine's configuration, llama.cpp's vocabulary
                   load, tokenize/detokenize, and the chat template
    onnx_config    runtimes.onnxrt.read_folder_config over genai_config.json + tokenizer_config.json
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

# genai_config.json, this, then tokenizer_config.json: the onnx_config harness's input
ONNX_SEPARATOR = b"\n\x00--tokenizer_config.json--\x00\n"

_WORK = Path(tempfile.mkdtemp(prefix="edgeai-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def _write(name: str, data: bytes) -> Path:
    path = _WORK / name
    path.write_bytes(data)
    return path


def safetensors(data: bytes) -> None:
    """`data` as a checkpoint folder's only model.safetensors: open it, read and release every tensor.
    A file it accepts must give each tensor in the shape and size its header declares."""
    from edgeai.converters.sources import SafetensorsCheckpoint
    from edgeai.errors import EdgeAIError

    folder = _WORK / "safetensors"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    try:
        ckpt = SafetensorsCheckpoint(folder)
    except EdgeAIError:
        return
    try:
        for name, info in ckpt.infos().items():
            values = ckpt.read(name)
            assert values.shape == info.shape and values.dtype == np.float32, (name, values.shape, info)
            assert values.size * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}[info.dtype] == info.nbytes, (name, info)
            ckpt.release(name)
    finally:
        ckpt.close()


def gguf_metadata(data: bytes) -> None:
    """`data` as a .gguf: plan its re-encoding (the converter's gguf-py reader, architecture spec and
    hyper-parameters), derive the native engine's configuration (the native reader), load its
    vocabulary in llama.cpp (after the reader's vocabulary check), tokenize and detokenize, and
    compile and render its chat template."""
    from edgeai.converters.plan import open_plan
    from edgeai.errors import EdgeAIError
    from edgeai.chat_template import render
    from edgeai.errors import ChatTemplateError
    from edgeai.model import _compile_template
    from edgeai.gguf_header import read_header
    from edgeai.runtimes.native import engine_config
    from edgeai.runtimes.vocab import GGUFVocab

    path = _write("model.gguf", data)
    try:
        plan = open_plan(path, "f16")
        plan.close()
    except EdgeAIError:
        pass
    try:
        engine_config(read_header(path))
    except EdgeAIError:
        pass
    try:
        vocab = GGUFVocab(path)
    except EdgeAIError:
        return
    try:
        ids = vocab.tokenize("ab\n<|im_end|> x", parse_special=True)
        assert all(0 <= t < vocab.n_vocab for t in ids), ids
        vocab.detokenize(ids)
        template, plain = _compile_template(vocab.chat_template, str(path))
        variables = dict(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True, bos_token="",
                         eos_token="")
        if template is not None:
            try:  # as Model.render_chat: the bounded sandbox's refusals are errors, other failures fall back
                render(template, variables, str(path))
            except ChatTemplateError:
                pass
            except Exception:
                pass
        render(plain, variables, str(path))
    finally:
        vocab.close()


def onnx_config(data: bytes) -> None:
    """`data` split at ONNX_SEPARATOR into an ONNX folder's genai_config.json and tokenizer_config.json,
    read as the onnxruntime backend reads them before it loads the graph."""
    from edgeai.errors import EdgeAIError
    from edgeai.runtimes.onnxrt import read_folder_config

    folder = _WORK / "onnx"
    folder.mkdir(exist_ok=True)
    genai, _, tok_config = data.partition(ONNX_SEPARATOR)
    (folder / "genai_config.json").write_bytes(genai)
    (folder / "tokenizer_config.json").write_bytes(tok_config)
    try:
        config = read_folder_config(folder)
    except EdgeAIError:
        return
    assert config.n_layer > 0 and config.n_head_kv > 0 and config.head_dim > 0 and config.n_vocab > 0, config
    assert len(config.past_names) == len(config.present_names) == 2 * config.n_layer, config


HARNESSES = {"safetensors": safetensors, "gguf_metadata": gguf_metadata, "onnx_config": onnx_config}
