"""Seed corpora of the fuzzers, made by the project's own writers: GGUF files by
`edgeai.gguf_writer.GGUFWriter`, safetensors files by `safetensors.numpy.save_file` (the writer
the tests use), ONNX folder configs by the ONNX exporter's `_genai_config`.

`write_seeds()` writes them into the committed corpora (`CORPORA`: the C++ harnesses' beside them in
native/fuzz/corpus, the Python harnesses' in tests/fuzz/corpus); `benchmarks/fuzz.py seeds` calls it. Every model is
tiny (vocabulary 8, or 264 with SentencePiece byte tokens; width 32, one layer) so that a corpus stays a few kB a file and a fuzzing run
does hundreds of executions a second even through the whole engine.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
# harness name -> its corpus folder (seed-* files from here, crash-* files: inputs that once failed)
CORPORA = {name: REPO / "native" / "fuzz" / "corpus" / name for name in ("gguf", "model")} | {
    name: REPO / "tests" / "fuzz" / "corpus" / name for name in ("safetensors", "gguf_metadata", "onnx_config")}

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, HEAD_DIM = 32, 32, 2, 1, 32
# a gpt2-style vocabulary: bytes of GPT-2's alphabet, one merge, the chat markers
TOKENS = ["a", "b", "ab", "Ċ", "Ġ", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tensor(kind, shape_numpy: tuple[int, ...], rng: np.random.Generator) -> bytes:
    """Bytes of a random tensor of numpy shape `shape_numpy` in GGML type `kind`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    values = (0.2 * rng.standard_normal(shape_numpy)).astype(np.float32)
    if kind == GGMLQuantizationType.F32:
        return values.tobytes()
    if kind == GGMLQuantizationType.F16:
        return values.astype(np.float16).tobytes()
    return quantize(values, kind).tobytes()


def tiny_gguf(arch: str = "llama", matrices: str = "Q8_0", *, n_expert: int = 0, tokenizer: str = "gpt2",
              tied: bool = True, seed: int = 0) -> bytes:
    """A whole model the native engine runs, as GGUF bytes: `arch` (llama, qwen2, qwen3, qwen3moe),
    its matrices in GGML type `matrices` (norms F32), n_expert experts (1 used), and a tokenizer of
    kind `tokenizer` ('gpt2' with merges, 'llama' with scores, or 'none': no tokenizer keys)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as V

    from edgeai.gguf_writer import GGUFWriter

    rng = np.random.default_rng(seed)
    mat = Q[matrices]
    tokens, types = TOKENS, [1] * 5 + [3] * 3  # normal, control
    if tokenizer == "llama":  # SentencePiece spells what it has no token for in byte tokens
        tokens, types = tokens + [f"<0x{b:02X}>" for b in range(256)], types + [6] * 256
    n_vocab = len(tokens)
    q_dim, kv_dim = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    # (name, numpy shape [rows, cols], type)
    tensors = [("token_embd.weight", (n_vocab, N_EMBD), mat), ("output_norm.weight", (N_EMBD,), Q.F32)]
    if not tied:
        tensors.append(("output.weight", (n_vocab, N_EMBD), mat))
    p = "blk.0."
    tensors += [(p + "attn_norm.weight", (N_EMBD,), Q.F32), (p + "attn_q.weight", (q_dim, N_EMBD), mat),
                (p + "attn_k.weight", (kv_dim, N_EMBD), mat), (p + "attn_v.weight", (kv_dim, N_EMBD), mat),
                (p + "attn_output.weight", (N_EMBD, q_dim), mat), (p + "ffn_norm.weight", (N_EMBD,), Q.F32)]
    if arch == "qwen2":
        tensors += [(p + f"attn_{x}.bias", (d,), Q.F32) for x, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))]
    if arch in ("qwen3", "qwen3moe"):
        tensors += [(p + "attn_q_norm.weight", (HEAD_DIM,), Q.F32), (p + "attn_k_norm.weight", (HEAD_DIM,), Q.F32)]
    if n_expert:
        tensors += [(p + "ffn_gate_inp.weight", (n_expert, N_EMBD), Q.F32),
                    (p + "ffn_gate_exps.weight", (n_expert, N_FF, N_EMBD), mat),
                    (p + "ffn_up_exps.weight", (n_expert, N_FF, N_EMBD), mat),
                    (p + "ffn_down_exps.weight", (n_expert, N_EMBD, N_FF), mat)]
    else:
        tensors += [(p + "ffn_gate.weight", (N_FF, N_EMBD), mat), (p + "ffn_up.weight", (N_FF, N_EMBD), mat),
                    (p + "ffn_down.weight", (N_EMBD, N_FF), mat)]
    data = {name: _tensor(kind, shape, rng) for name, shape, kind in tensors}

    out = io.BytesIO()
    w = GGUFWriter(out)
    w.add("general.architecture", arch)
    w.add("general.name", f"fuzz seed {arch} {matrices}")
    hp = {"context_length": 128, "embedding_length": N_EMBD, "block_count": 1, "feed_forward_length": N_FF,
          "attention.head_count": N_HEAD, "attention.head_count_kv": N_HEAD_KV, "attention.key_length": HEAD_DIM,
          "attention.value_length": HEAD_DIM}
    if n_expert:
        hp.update({"expert_count": n_expert, "expert_used_count": 1, "expert_feed_forward_length": N_FF})
    for key, value in hp.items():
        w.add(f"{arch}.{key}", value, V.UINT32)
    w.add(f"{arch}.rope.freq_base", 10000.0, V.FLOAT32)
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, V.FLOAT32)
    if tokenizer != "none":
        w.add("tokenizer.ggml.model", tokenizer)
        w.add("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING)
        w.add("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)
        if tokenizer == "gpt2":
            w.add("tokenizer.ggml.pre", "default")
            w.add("tokenizer.ggml.merges", ["a b"], V.ARRAY, V.STRING)
        else:
            w.add("tokenizer.ggml.scores", [float(-i) for i in range(n_vocab)], V.ARRAY, V.FLOAT32)
        w.add("tokenizer.ggml.bos_token_id", 6, V.UINT32)
        w.add("tokenizer.ggml.eos_token_id", 7, V.UINT32)
        w.add("tokenizer.chat_template", CHAT_TEMPLATE)
    for name, shape, kind in tensors:
        w.add_tensor(name, shape, kind, len(data[name]))
    w.write_header()
    for name, _, _ in tensors:
        w.write_tensor(name, data[name])
    w.finish()
    return out.getvalue()


def metadata_gguf() -> bytes:
    """A tensor-less GGUF with one key of every value type and arrays of each element type."""
    from gguf import GGUFValueType as V

    from edgeai.gguf_writer import GGUFWriter

    out = io.BytesIO()
    w = GGUFWriter(out)
    w.add("general.alignment", 64, V.UINT32)
    for i, vt in enumerate((V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)):
        w.add(f"int.{i}", 1, vt)
        w.add(f"ints.{i}", [1, 2], V.ARRAY, vt)
    w.add("f32", 0.5, V.FLOAT32)
    w.add("f64", 0.25, V.FLOAT64)
    w.add("bool", True, V.BOOL)
    w.add("str", "ü")
    w.add("strs", ["x", "y"], V.ARRAY, V.STRING)
    w.add("tokenizer.ggml.tokens", ["a", "b"], V.ARRAY, V.STRING)
    w.write_header()
    w.finish()
    return out.getvalue()


def safetensors_seeds() -> dict[str, bytes]:
    """Small safetensors files: each dtype edgeai reads, an empty and a 0-d tensor, metadata, and a
    dtype it refuses."""
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    return {
        "f32": save({"a": rng.standard_normal((2, 3)).astype(np.float32), "b": np.ones(4, np.float32)},
                    metadata={"format": "pt"}),
        "f16_f64": save({"h": np.arange(6, dtype=np.float16).reshape(3, 2), "d": np.arange(2, dtype=np.float64)}),
        "empty_scalar": save({"e": np.zeros((0, 4), np.float32), "s": np.array(3.0, np.float32)}),
        "int32": save({"i": np.arange(3, dtype=np.int32)}),
    }


def onnx_config_seed() -> bytes:
    """genai_config.json and tokenizer_config.json of an ONNX folder, as the exporter writes them,
    joined by harnesses.ONNX_SEPARATOR (the onnx_config harness's input format)."""
    from types import SimpleNamespace

    from edgeai.converters.onnx_export import _genai_config
    from harnesses import ONNX_SEPARATOR

    kv = [SimpleNamespace(key="tokenizer.ggml.eos_token_id", value=7), SimpleNamespace(key="tokenizer.ggml.bos_token_id", value=6)]
    plan = SimpleNamespace(kv=kv, spec=SimpleNamespace(gguf_arch="llama", moe=None))
    hp = SimpleNamespace(head_dim=HEAD_DIM, n_embd=N_EMBD, n_head=N_HEAD, n_layer=1, n_head_kv=N_HEAD_KV, n_vocab=len(TOKENS))
    genai = json.dumps(_genai_config(plan, hp, 64)).encode()
    tok_config = json.dumps({"eos_token": "<|im_end|>", "bos_token": {"content": "<|im_start|>"},
                             "chat_template": CHAT_TEMPLATE}).encode()
    return genai + ONNX_SEPARATOR + tok_config


def write_seeds(corpora: dict[str, Path] = CORPORA) -> dict[str, list[Path]]:
    """Every corpus's seeds as corpora[NAME]/seed-*; returns the files written by corpus."""
    models = {
        "seed-llama-q8_0": tiny_gguf("llama", "Q8_0"),
        "seed-qwen2-q4_0-untied": tiny_gguf("qwen2", "Q4_0", tied=False, tokenizer="llama"),
        "seed-qwen3-f16": tiny_gguf("qwen3", "F16", tokenizer="none"),
        "seed-qwen3moe-q8_0": tiny_gguf("qwen3moe", "Q8_0", n_expert=2),
    }
    seeds = {
        "model": models,
        "gguf": {**models, "seed-metadata": metadata_gguf()},
        "gguf_metadata": {"seed-gpt2": models["seed-llama-q8_0"], "seed-spm": models["seed-qwen2-q4_0-untied"]},
        "safetensors": {f"seed-{k}": v for k, v in safetensors_seeds().items()},
        "onnx_config": {"seed-exported": onnx_config_seed()},
    }
    written: dict[str, list[Path]] = {}
    for name, files in seeds.items():
        folder = corpora[name]
        folder.mkdir(parents=True, exist_ok=True)
        written[name] = []
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
            written[name].append(folder / fname)
    return written
