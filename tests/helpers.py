"""Shared test helpers: tiny tokenizers and checkpoints made at test time, and llama.cpp access.

Nothing here downloads anything: tokenizers are trained on text from Python's own standard
library, models are random with a fixed seed.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Varied text: code, unicode, numbers, whitespace runs, chat markup.
VARIED_TEXT = (
    "Hello world! Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🚀, Ελληνικά.\n"
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\n"
    "Numbers: 3.14159, 1234567890, -42, 0x1F, 1e-5, 2024-11-22.\n"
    "Tabs\tand    runs of     spaces   \n\n   trailing   \n"
    "<|im_start|>user\nWhat's 2+2? I'm sure it's 4. They'll know; we'd've done it.<|im_end|>\n"
    "<|im_start|>assistant\nIt's 4.<|im_end|>\n"
    "URL: https://example.com/a?b=c&d=e#frag   \"quoted\" 'single' (parens) [brackets] {braces}\n"
)

QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def kld(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(ref || got) over positions, from logits [n, vocab]."""
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    p, q = log_softmax(ref), log_softmax(got)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def corpus() -> list[str]:
    """Training text for tiny tokenizers: standard-library sources plus the varied text."""
    import argparse
    import json as json_mod
    import textwrap

    lines = []
    for mod in (textwrap, argparse, json_mod):
        lines += inspect.getsource(mod).splitlines()
    lines += VARIED_TEXT.splitlines() * 20
    return [line for line in lines if line.strip()]


def train_bpe_tokenizer(folder: Path, style: str, vocab_size: int = 400) -> int:
    """A byte-level BPE tokenizer in `folder` (tokenizer.json + tokenizer_config.json).

    style: 'gpt2' (ByteLevel with GPT-2's regex), 'smollm' (digits split first),
    'qwen2' or 'llama3' (their split regex, then ByteLevel without regex). Returns the vocab size.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("gpt2", "smollm"))
    if style == "gpt2":
        tok.pre_tokenizer = byte_level
    elif style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        regex = {"qwen2": QWEN2_SPLIT, "llama3": LLAMA3_SPLIT}[style]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def train_spm_tokenizer(folder: Path, vocab_size: int = 400, user_defined_symbols: list[str] | None = None) -> int:
    """A SentencePiece (BPE, byte fallback) tokenizer in `folder`, saved as tokenizer.model plus
    the Hugging Face files transformers writes for it. Returns the vocab size.
    user_defined_symbols: pieces kept whole (Gemma's chat markers are such pieces)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=1, minloglevel=2, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, **({"user_defined_symbols": user_defined_symbols} if user_defined_symbols else {}),
    )
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    # transformers builds its tokenizer.json from tokenizer.model when loading the folder
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return vocab_size


@dataclass(frozen=True)
class TinyArch:
    """A tiny config for one family, and the tokenizer kind its folder gets."""

    name: str
    model_type: str
    tokenizer: str  # 'spm' or a train_bpe_tokenizer style
    extra: dict


COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)

TINY_ARCHS = [
    TinyArch("llama", "llama", "spm", dict(rms_norm_eps=1e-5)),
    TinyArch("llama3", "llama", "llama3", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=True)),
    TinyArch("smollm", "llama", "smollm", dict(tie_word_embeddings=True)),
    TinyArch("mistral", "mistral", "spm", dict(head_dim=16)),
    TinyArch("qwen2", "qwen2", "qwen2", dict(tie_word_embeddings=True)),
    TinyArch("qwen3", "qwen3", "qwen2", dict(head_dim=24)),
    TinyArch("mixtral", "mixtral", "spm", dict(num_local_experts=4, num_experts_per_tok=2)),
    TinyArch("qwen2_moe", "qwen2_moe", "qwen2", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False)),
    TinyArch("qwen3_moe", "qwen3_moe", "qwen2", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True)),
    TinyArch("olmoe", "olmoe", "gpt2", dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=4,
                                            norm_topk_prob=False)),
]


def make_tiny_checkpoint(folder: Path, arch: TinyArch, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Save a random tiny model of `arch` with its tokenizer into `folder` (safetensors).

    `overrides` replace config values (e.g. hidden_size=72).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if arch.tokenizer == "spm":
        n_vocab = train_spm_tokenizer(folder)
    else:
        n_vocab = train_bpe_tokenizer(folder, arch.tokenizer)
    config = AutoConfig.for_model(arch.model_type, vocab_size=n_vocab, **{**COMMON, **arch.extra, **overrides},
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.eval()
    model.save_pretrained(folder)
    return folder


def llama_cpp_model(path: Path, n_ctx: int = 256, **kwargs):
    """Load a GGUF in llama.cpp (llama-cpp-python), quietly, with all logits kept.

    The KV cache is F32 (llama.cpp's default is F16, which alone moves logits by ~1e-3).
    """
    from llama_cpp import GGML_TYPE_F32, Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                 n_batch=n_ctx, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kwargs)


def llama_cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    """Logits at every position of `tokens`: [n_tokens, n_vocab]."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def native_greedy(backend, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` from a native backend, from an empty cache (one step each)."""
    from edgeai.runtimes.base import GREEDY

    backend.truncate(0)
    backend.set_sampling(GREEDY)
    out, nxt = [], backend.step(prompt)
    for _ in range(n):
        out.append(nxt)
        nxt = backend.step([nxt])
    return out


def llama_cpp_greedy(llm, tokens: list[int], n: int) -> list[int]:
    """n greedy tokens after `tokens`, one eval per step (no sampling code involved)."""
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def hf_greedy(model, tokens: list[int], n: int) -> list[int]:
    """n greedy tokens from a transformers model by argmax, one token per step over its KV cache:
    the same loop as `llama_cpp_greedy`, with no generation-config rules (EOS, min length) in between."""
    import torch

    out = []
    with torch.no_grad():
        step = model(torch.tensor([tokens]), use_cache=True)
        for _ in range(n):
            nxt = int(torch.argmax(step.logits[0, -1]))
            out.append(nxt)
            step = model(torch.tensor([[nxt]]), past_key_values=step.past_key_values, use_cache=True)
    return out


def hf_logits_and_greedy(folder: Path, tokens: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """transformers' logits over `tokens` ([n_tokens, n_vocab]) and its n greedy continuations."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float().numpy()
    return logits, hf_greedy(model, tokens, n)


class Run(NamedTuple):
    """One engine's logits over a prompt ([n_tokens, n_vocab]) and its greedy tokens after it."""

    logits: np.ndarray
    greedy: list[int]


def native_and_llama_cpp(path: Path, tokens: list[int], n_greedy: int) -> tuple[Run, Run]:
    """(ours, llama.cpp's) on the same GGUF: each engine's logits over `tokens` and its n_greedy
    greedy tokens after them (native_greedy, llama_cpp_greedy). Ours with its f16 KV cache,
    llama.cpp's F32 (llama_cpp_model); both 256 positions, 2 threads."""
    from edgeai.runtimes.native import NativeBackend

    b = NativeBackend(path, n_ctx=256, threads=2)
    try:
        ours = Run(b.eval_logits(tokens), native_greedy(b, tokens, n_greedy))
    finally:
        b.close()
    llm = llama_cpp_model(path)
    return ours, Run(llama_cpp_logits(llm, tokens), llama_cpp_greedy(llm, tokens, n_greedy))


def assert_agrees_with_transformers_and_llama_cpp(folder: Path, path: Path, tokens: list[int], n_greedy: int, *,
                                                  llama_cpp_bound: float, native_bound: float, kld_bound: float) -> None:
    """The three-way check of a tiny checkpoint (`folder`) and its conversion (`path`): over `tokens`,
    llama.cpp's logits within llama_cpp_bound of transformers' and ours within native_bound (largest
    difference), KLD of ours from transformers' and from llama.cpp's each below kld_bound, and
    n_greedy greedy tokens of both engines equal to transformers'."""
    ref = Run(*hf_logits_and_greedy(folder, tokens, n_greedy))
    ours, theirs = native_and_llama_cpp(path, tokens, n_greedy)
    diff = np.abs(theirs.logits - ref.logits).max()
    assert diff < llama_cpp_bound, f"llama.cpp's logits differ from transformers' by {diff} (bound {llama_cpp_bound})"
    diff = np.abs(ours.logits - ref.logits).max()
    assert diff < native_bound, f"our logits differ from transformers' by {diff} (bound {native_bound})"
    from_ref, from_theirs = kld(ref.logits, ours.logits), kld(theirs.logits, ours.logits)
    assert from_ref < kld_bound and from_theirs < kld_bound, \
        f"KLD of ours from transformers' {from_ref}, from llama.cpp's {from_theirs} (bound {kld_bound})"
    assert theirs.greedy == ref.greedy, f"llama.cpp's greedy tokens {theirs.greedy} != transformers' {ref.greedy}"
    assert ours.greedy == ref.greedy, f"our greedy tokens {ours.greedy} != transformers' {ref.greedy}"


def smollm2_hf_checkpoint(folder: Path) -> Path:
    """The bundled SmolLM2 GGUF turned into a Hugging Face checkpoint (float16 safetensors) by
    transformers' own GGUF loader: the source checkpoint for round-trip tests."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from edgeai.paths import default_model_path

    gguf_path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float16,
    )
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_random_moe_gguf(path: Path, *, n_embd: int = 256, n_layer: int = 4, n_expert: int = 16, n_expert_used: int = 4,
                          n_ff: int = 128, n_head: int = 4, n_head_kv: int = 2, head_dim: int = 64,
                          alignment: int = 4096, seed: int = 0) -> Path:
    """A Qwen3-MoE GGUF with random Q4_0 weights (F32 norms and router) and SmolLM2's tokenizer.

    Written expert by expert, so a file of several GB needs little memory; llama.cpp loads it.
    Scales are 1/(4.6 sqrt(fan_in)) (embeddings: 1/4.6) so that a random Q4_0 row (codes -8..7, std ~4.6) has
    weights of std 1/sqrt(fan_in) and activations stay finite. alignment: GGUF's tensor data
    alignment (4096 puts every expert slice on a page; 32 is the usual).
    Used by the expert-streaming tests and benchmarks/expert_streaming.py.
    """
    from gguf import GGMLQuantizationType, GGUFValueType

    from edgeai.gguf_writer import GGUFWriter
    from edgeai.converters.sources import GGUFSource
    from edgeai.paths import default_model_path

    rng = np.random.default_rng(seed)
    q4 = GGMLQuantizationType.Q4_0

    def q4_0(rows: int, cols: int, std: float | None = None) -> bytes:
        blocks = np.frombuffer(rng.bytes(rows * cols // 32 * 18), np.uint8).reshape(-1, 18).copy()
        # codes 0..15 mean -0.5 after the -8 offset: a shared shift that grows through the layers until
        # every input gives the same output. Code 0 (-8) becomes 8 (0): mean exactly 0.
        lo, hi = blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4
        lo[lo == 0] = 8
        hi[hi == 0] = 8
        blocks[:, 2:] = lo | (hi << 4)
        scale = (1 / np.sqrt(cols) if std is None else std) / 4.6
        blocks[:, :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
        return blocks.tobytes()

    def f32(*shape: int, scale: float = 1.0, offset: float = 0.0) -> bytes:
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32).tobytes()

    source = GGUFSource(default_model_path())
    meta = source.metadata()
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    path = Path(path)
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, object]] = [
        # embeddings of std 1 (as large as a layer's output), else every token looks alike after the layers
        ("token_embd.weight", (n_embd, n_vocab), q4, lambda: q4_0(n_vocab, n_embd, std=1.0)),
        ("output_norm.weight", (n_embd,), GGMLQuantizationType.F32, lambda: f32(n_embd, scale=0.0, offset=1.0)),
        # untied: with the embedding as output matrix, a random model predicts its input token forever
        ("output.weight", (n_embd, n_vocab), q4, lambda: q4_0(n_vocab, n_embd)),
    ]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", (n_embd,), GGMLQuantizationType.F32, lambda: f32(n_embd, scale=0.0, offset=1.0)),
            (p + "attn_q.weight", (n_embd, q_dim), q4, lambda: q4_0(q_dim, n_embd)),
            (p + "attn_k.weight", (n_embd, kv_dim), q4, lambda: q4_0(kv_dim, n_embd)),
            (p + "attn_v.weight", (n_embd, kv_dim), q4, lambda: q4_0(kv_dim, n_embd)),
            (p + "attn_output.weight", (q_dim, n_embd), q4, lambda: q4_0(n_embd, q_dim)),
            (p + "attn_q_norm.weight", (head_dim,), GGMLQuantizationType.F32, lambda: f32(head_dim, scale=0.0, offset=1.0)),
            (p + "attn_k_norm.weight", (head_dim,), GGMLQuantizationType.F32, lambda: f32(head_dim, scale=0.0, offset=1.0)),
            (p + "ffn_norm.weight", (n_embd,), GGMLQuantizationType.F32, lambda: f32(n_embd, scale=0.0, offset=1.0)),
            (p + "ffn_gate_inp.weight", (n_embd, n_expert), GGMLQuantizationType.F32,
             lambda: f32(n_expert, n_embd, scale=1 / np.sqrt(n_embd))),
            (p + "ffn_gate_exps.weight", (n_embd, n_ff, n_expert), q4, lambda: (q4_0(n_ff, n_embd) for _ in range(n_expert))),
            (p + "ffn_up_exps.weight", (n_embd, n_ff, n_expert), q4, lambda: (q4_0(n_ff, n_embd) for _ in range(n_expert))),
            (p + "ffn_down_exps.weight", (n_ff, n_embd, n_expert), q4, lambda: (q4_0(n_embd, n_ff) for _ in range(n_expert))),
        ]
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as out:
        w = GGUFWriter(out, alignment=alignment)
        a = "qwen3moe"
        w.add("general.architecture", a)
        w.add("general.name", f"random qwen3moe {n_layer}x{n_expert}x{n_ff}")
        for key, value in (("context_length", 4096), ("embedding_length", n_embd), ("block_count", n_layer),
                           ("feed_forward_length", n_ff), ("attention.head_count", n_head),
                           ("attention.head_count_kv", n_head_kv), ("attention.key_length", head_dim),
                           ("attention.value_length", head_dim), ("expert_count", n_expert),
                           ("expert_used_count", n_expert_used), ("expert_feed_forward_length", n_ff)):
            w.add(f"{a}.{key}", value, GGUFValueType.UINT32)
        w.add(f"{a}.rope.freq_base", 1e6, GGUFValueType.FLOAT32)
        w.add(f"{a}.attention.layer_norm_rms_epsilon", 1e-6, GGUFValueType.FLOAT32)
        for key, value in meta.items():
            if key.startswith("tokenizer."):
                vtype, sub = source.value_type(key)
                w.add(key, value, vtype, sub if vtype == GGUFValueType.ARRAY else None)
        for name, shape, kind, _ in tensors:
            n = int(np.prod(shape))
            nbytes = n * 4 if kind == GGMLQuantizationType.F32 else n // 32 * 18
            w.add_tensor(name, tuple(reversed(shape)), kind, nbytes)  # shapes above in ggml order, the writer's numpy order
        w.write_header()
        for name, _, _, make in tensors:
            data = make()
            if isinstance(data, bytes):
                w.write_tensor(name, data)
            else:
                w.write_tensor_chunks(name, data)
        w.finish()
    source.close()
    tmp.replace(path)
    return path


# Gemma 3 270M's config.json (google/gemma-3-270m) with only the sizes shrunk: the layer pattern (every
# 6th layer global; 7 layers keep a local layer after the global one), the rotary bases, the query
# scale (query_pre_attn_scalar == head_dim, as there), the tanh GELU, tied embeddings. The window is
# 16 positions so that test contexts exceed it many times over.
GEMMA3_TINY = TinyArch("gemma3", "gemma3_text", "spm", dict(
    num_hidden_layers=7, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, intermediate_size=128,
    sliding_window=16, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, final_logit_softcapping=None,
    attn_logit_softcapping=None, max_position_embeddings=32768))


GEMMA3_MARKERS = ("<start_of_turn>", "<end_of_turn>")


def make_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    """A random tiny Gemma 3 (`GEMMA3_TINY`) whose RMSNorm weights are random too (Gemma initialises
    them to 0, i.e. a factor of 1, which would hide a missing +1 in the conversion)."""
    import torch
    from safetensors.torch import load_file, save_file

    from transformers import AutoTokenizer

    from edgeai.architectures import GEMMA3_CHAT_TEMPLATE

    make_tiny_checkpoint(folder, GEMMA3_TINY, seed=seed)
    # Gemma's chat markers are pieces of its SentencePiece model, marked special by transformers
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    train_spm_tokenizer(folder, user_defined_symbols=list(GEMMA3_MARKERS))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": list(GEMMA3_MARKERS)})
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    tok.save_pretrained(folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = (0.3 * torch.randn(t.shape, generator=gen)).to(t.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


# gpt-oss-20b's config.json with the sizes shrunk (24 -> 4 layers, 2880 -> 64 wide, 32 -> 8 experts,
# window 128 -> 16); every feature kept: alternating sliding/full layers, YaRN as shipped (truncate
# false), attention biases and sinks, router bias, the clamped SwiGLU, an untied output.
GPTOSS_TINY = TinyArch("gpt_oss", "gpt_oss", "qwen2", dict(
    hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, num_local_experts=8, num_experts_per_tok=4, experts_per_token=4, sliding_window=16,
    layer_types=["sliding_attention", "full_attention"] * 2, attention_bias=True, attention_dropout=0.0,
    hidden_act="silu", initial_context_length=4096, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
    swiglu_limit=7.0, tie_word_embeddings=False, router_aux_loss_coef=0.9, output_router_logits=False,
    initializer_range=0.1))


def make_tiny_gptoss(folder: Path, seed: int = 0) -> Path:
    """A random tiny gpt-oss (`GPTOSS_TINY`) whose norms, biases and sinks are random too and large
    enough to matter: sinks take a real share of each softmax, and the experts' gate/up biases push
    some values past the SwiGLU clamp (|x| > 7)."""
    import torch
    from safetensors.torch import load_file, save_file

    make_tiny_checkpoint(folder, GPTOSS_TINY, seed=seed)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    gen = torch.Generator().manual_seed(seed + 1)
    # a decisive router, as trained ones are: random small logits leave near-ties in the top-k that a
    # rounding anywhere (an f16 KV cache) flips, and one flipped expert moves a token's logits by ~0.5
    scales = {"norm.weight": (1.0, 0.3), "sinks": (0.0, 1.0), "gate_up_proj_bias": (0.0, 4.0), "bias": (0.0, 0.3),
              "router.weight": (0.0, 0.3)}
    for name, t in tensors.items():
        for suffix, (mean, std) in scales.items():
            if name.endswith(suffix):
                tensors[name] = (mean + std * torch.randn(t.shape, generator=gen)).to(t.dtype)
                break
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


# what OpenAI's gpt-oss checkpoints say: only the experts are MXFP4
GPTOSS_MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def gptoss_with_mxfp4_experts(f32_folder: Path, folder: Path) -> Path:
    """A copy of a float gpt-oss checkpoint whose experts are MXFP4 as OpenAI ships them: each
    `mlp.experts.{gate_up,down}_proj` [E, in, out] encoded by edgeai's reference encoder (ggml's
    bytes) and stored as `_blocks` [E, out, in/32, 16] and `_scales` [E, out, in/32] U8, with the
    config's quantization_config."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from edgeai.quant.blocks import mxfp4_to_openai
    from edgeai.quant.formats import FORMATS, quantize

    shutil.copytree(f32_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = np.ascontiguousarray(tensors.pop(name).swapaxes(-1, -2))  # [E, out, in]
        ggml = quantize(w, FORMATS["mxfp4"]).reshape(*w.shape[:-1], w.shape[-1] // 32, 17)
        tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4_to_openai(ggml)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = GPTOSS_MXFP4_CONFIG
    (folder / "config.json").write_text(json.dumps(config))
    return folder
