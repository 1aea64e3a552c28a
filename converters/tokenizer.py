"""Tokenizer and chat template -> GGUF metadata, the way llama.cpp reads them.

Two vocabulary kinds:
- byte-level BPE from tokenizer.json (`tokenizer.ggml.model = "gpt2"`), with merges and a
  pre-tokenizer name that llama.cpp knows. The name is found from the tokenizer's own
  pre-tokenizer definition (its split regexes), so a tokenizer is recognised by what it does.
- SentencePiece from tokenizer.model (`tokenizer.ggml.model = "llama"`), with scores and token types.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from edgeai.errors import TokenizerError

log = logging.getLogger(__name__)


class TokenType(enum.IntEnum):
    """llama.cpp's token types (tokenizer.ggml.token_type)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class MetaKV:
    key: str
    value: Any
    vtype: GGUFValueType | None = None
    sub_type: GGUFValueType | None = None


# Split regexes as they appear in tokenizer.json files (raw strings: backslashes are literal).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# pre-tokenizer signature (see _pre_signature) -> llama.cpp's `tokenizer.ggml.pre`
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel",): "gpt-2",  # GPT-2's own regex inside ByteLevel
    ("digits", "bytelevel"): "smollm",  # every digit alone, then GPT-2's regex (SmolLM, StarCoder)
    ("split:" + _LLAMA3_SPLIT, "bytelevel-noregex"): "llama-bpe",
    ("split:" + _QWEN2_SPLIT, "bytelevel-noregex"): "qwen2",
}


def _pre_signature(pre: dict | None) -> tuple[str, ...]:
    """A hashable description of a tokenizer.json pre_tokenizer."""
    if pre is None:
        return ()
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    sig = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            name = "bytelevel" if step.get("use_regex", True) else "bytelevel-noregex"
            sig.append(name + ("+prefix-space" if step.get("add_prefix_space") else ""))
        elif kind == "Digits":
            sig.append("digits" if step.get("individual_digits") else "digits-grouped")
        elif kind == "Split":
            pattern = step.get("pattern", {})
            regex = pattern.get("Regex", pattern.get("String", ""))
            extra = "" if (step.get("behavior") == "Isolated" and not step.get("invert")) else f"[{step.get('behavior')},{step.get('invert')}]"
            sig.append(f"split:{regex}{extra}")
        else:
            sig.append(str(kind))
    return tuple(sig)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path} could not be read as JSON: {exc}") from exc


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def chat_template(folder: Path) -> str | None:
    """The chat template: tokenizer_config.json's `chat_template`, else chat_template.jinja/.json."""
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        template = _read_json(tok_config).get("chat_template")
        if isinstance(template, list):  # named templates: llama.cpp takes the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, str):
            return template
    return None


def tokenizer_kv(folder: Path, n_vocab: int, config: dict) -> list[MetaKV]:
    """All `tokenizer.*` metadata for a Hugging Face folder whose model has `n_vocab` embedding rows."""
    folder = Path(folder)
    tok_json = folder / "tokenizer.json"
    spm_model = folder / "tokenizer.model"
    tj = _read_json(tok_json) if tok_json.is_file() else None
    model = (tj or {}).get("model") or {}
    is_byte_level = tj is not None and model.get("type") == "BPE" and not model.get("byte_fallback") and (
        "bytelevel" in " ".join(_pre_signature(tj.get("pre_tokenizer"))) or (tj.get("decoder") or {}).get("type") == "ByteLevel"
    )
    if is_byte_level:
        kv, vocab = _byte_level_bpe(tok_json, tj, n_vocab)
    elif spm_model.is_file():
        kv, vocab = _sentencepiece(spm_model, tj, n_vocab)
    elif tj is not None:
        raise TokenizerError(
            f"{tok_json}: a {model.get('type')} tokenizer"
            f"{' with byte fallback' if model.get('byte_fallback') else ''} and no tokenizer.model; edgeai writes "
            "byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model) vocabularies; add the "
            "tokenizer.model file to the folder"
        )
    else:
        raise TokenizerError(f"{folder} has no tokenizer.json or tokenizer.model; copy the tokenizer files beside config.json")
    kv += _special_tokens(folder, tj, vocab, config)
    template = chat_template(folder)
    if template is not None:
        kv.append(MetaKV("tokenizer.chat_template", template))
    return kv


def _pad_vocab(tokens: list[str], types: list[int], n_vocab: int, source: Path) -> None:
    """Pad to the embedding's row count, as llama.cpp needs one token per row."""
    if len(tokens) > n_vocab:
        raise TokenizerError(
            f"{source} has {len(tokens)} tokens but the model's embedding has only {n_vocab} rows; "
            "the tokenizer does not belong to this checkpoint"
        )
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)


def _byte_level_bpe(path: Path, tj: dict, n_vocab: int) -> tuple[list[MetaKV], dict[str, int]]:
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    specials: dict[int, bool] = {}
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        specials[added["id"]] = bool(added.get("special"))
    size = max(vocab.values()) + 1
    by_id: list[str | None] = [None] * size
    for text, idx in vocab.items():
        by_id[idx] = text
    tokens, types = [], []
    for idx, text in enumerate(by_id):
        if text is None:  # a hole in the id space
            tokens.append(f"[PAD{idx}]")
            types.append(TokenType.UNUSED)
        elif idx in specials:
            tokens.append(text)
            types.append(TokenType.CONTROL if specials[idx] else TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)
    _pad_vocab(tokens, types, n_vocab, path)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    signature = _pre_signature(tj.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        raise TokenizerError(
            f"{path}: pre-tokenizer {list(signature)} is not one llama.cpp is known to reproduce "
            f"(recognised: {', '.join(sorted(set(PRE_TOKENIZERS.values())))})"
        )
    kv = [
        MetaKV("tokenizer.ggml.model", "gpt2"),
        MetaKV("tokenizer.ggml.pre", pre),
        MetaKV("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        MetaKV("tokenizer.ggml.token_type", [int(t) for t in types], GGUFValueType.ARRAY, GGUFValueType.INT32),
        MetaKV("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
    ]
    return kv, vocab


def _sentencepiece(path: Path, tj: dict | None, n_vocab: int) -> tuple[list[MetaKV], dict[str, int]]:
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise TokenizerError(f"{path} is a SentencePiece model; reading it needs `pip install sentencepiece protobuf`") from exc
    try:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # sentencepiece raises RuntimeError/DecodeError on bad bytes
        raise TokenizerError(f"{path} is not a valid SentencePiece model: {exc}") from exc
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif proto.pieces[i].type == proto.SentencePiece.USER_DEFINED:  # Gemma: chat markers, whitespace runs
            types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    vocab = {t: i for i, t in enumerate(tokens)}
    for added in sorted((tj or {}).get("added_tokens", []), key=lambda a: a["id"]):
        idx = added["id"]
        if idx < len(tokens):
            # already a piece of the model; marked special, it is a control token (Gemma's <start_of_turn>)
            if added.get("special") and types[idx] in (TokenType.NORMAL, TokenType.USER_DEFINED):
                types[idx] = TokenType.CONTROL
            continue
        while len(tokens) < idx:  # a hole before the added token
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
        tokens.append(added["content"])
        scores.append(-1000.0)
        types.append(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
        vocab[added["content"]] = idx
    _pad_vocab(tokens, types, n_vocab, path)
    scores += [-1000.0] * (len(tokens) - len(scores))
    kv = [
        MetaKV("tokenizer.ggml.model", "llama"),
        MetaKV("tokenizer.ggml.pre", "default"),
        MetaKV("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        MetaKV("tokenizer.ggml.scores", scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
        MetaKV("tokenizer.ggml.token_type", [int(t) for t in types], GGUFValueType.ARRAY, GGUFValueType.INT32),
        MetaKV("tokenizer.ggml.add_space_prefix", bool(proto.normalizer_spec.add_dummy_prefix)),
    ]
    return kv, vocab


# llama.cpp role -> (tokenizer_config.json key, config.json key)
_SPECIAL_ROLES = {
    "bos": ("bos_token", "bos_token_id"),
    "eos": ("eos_token", "eos_token_id"),
    "unknown": ("unk_token", "unk_token_id"),
    "padding": ("pad_token", "pad_token_id"),
}


def _special_tokens(folder: Path, tj: dict | None, vocab: dict[str, int], config: dict) -> list[MetaKV]:
    """BOS/EOS/UNK/PAD ids and add_bos/add_eos, from tokenizer_config.json, else config.json."""
    tok_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    n_ids = max(vocab.values()) + 1
    kv: list[MetaKV] = []
    for role, (tok_key, config_key) in _SPECIAL_ROLES.items():
        text = _token_text(tok_config.get(tok_key))
        token_id = vocab.get(text) if text is not None else None
        if token_id is None:
            value = config.get(config_key)
            token_id = value[0] if isinstance(value, list) and value else value  # several EOS ids: the first
        if isinstance(token_id, int) and 0 <= token_id < n_ids:
            kv.append(MetaKV(f"tokenizer.ggml.{role}_token_id", token_id, GGUFValueType.UINT32))
    for flag in ("bos", "eos"):
        value = tok_config.get(f"add_{flag}_token")
        if value is None:
            value = post_processor_adds(tj, flag)
        if value is not None:
            kv.append(MetaKV(f"tokenizer.ggml.add_{flag}_token", bool(value)))
    return kv


def post_processor_adds(tj: dict | None, flag: str) -> bool | None:
    """Whether tokenizer.json's TemplateProcessing puts a special token before (flag "bos") or after
    (flag "eos") a single text; None when there is no such template."""
    post = (tj or {}).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") != "TemplateProcessing":
            continue
        single = step.get("single", [])
        seq_index = next((i for i, p in enumerate(single) if "Sequence" in p), 0)
        side = single[:seq_index] if flag == "bos" else single[seq_index + 1:]
        return any("SpecialToken" in p for p in side)
    return None
