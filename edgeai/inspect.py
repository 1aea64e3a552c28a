"""What an artifact holds: architecture, hyper-parameters, tensors by type, tokenizer, recipe."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeai.errors import CheckpointError


@dataclass(frozen=True)
class TypeStats:
    count: int
    n_bytes: int
    n_elements: int


@dataclass(frozen=True)
class ArtifactSummary:
    path: Path
    architecture: str
    name: str
    hparams: dict[str, object]
    types: dict[str, TypeStats]  # tensor type -> totals
    tokenizer: dict[str, object]
    recipe: dict[str, object] | None
    other: dict[str, object] = field(default_factory=dict)

    @property
    def n_tensors(self) -> int:
        return sum(s.count for s in self.types.values())

    @property
    def n_bytes(self) -> int:
        return sum(s.n_bytes for s in self.types.values())

    @property
    def n_parameters(self) -> int:
        return sum(s.n_elements for s in self.types.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / max(1, self.n_parameters)


def describe_gguf(path: str | Path) -> ArtifactSummary:
    """Summarise a GGUF file from its header (tensor data is not read)."""
    from edgeai.gguf_header import GGUFArray, read_header

    header = read_header(path)
    meta = header.metadata
    arch = str(meta.get("general.architecture", "?"))
    counts: Counter[str] = Counter()
    n_bytes: Counter[str] = Counter()
    n_elem: Counter[str] = Counter()
    for t in header.tensors.values():
        counts[t.type_name] += 1
        n_bytes[t.type_name] += t.nbytes
        n_elem[t.type_name] += t.n_elements
    types = {k: TypeStats(counts[k], n_bytes[k], n_elem[k]) for k in sorted(counts, key=lambda k: -n_bytes[k])}

    def shown(value: object) -> object:  # arrays stay in the file: their length is what is shown
        return f"[{len(value)} values]" if isinstance(value, GGUFArray) else value

    hparams = {k[len(arch) + 1:]: shown(v) for k, v in meta.items() if k.startswith(arch + ".")}
    tokens_ref = meta.get("tokenizer.ggml.tokens")
    roles = {role: meta.get(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "unknown", "padding")}
    roles = {role: token_id for role, token_id in roles.items() if token_id is not None}
    # the token texts are read only for the roles shown ("replace": a display must not fail on bad bytes)
    tokens = header.array("tokenizer.ggml.tokens", errors="replace") \
        if roles and isinstance(tokens_ref, GGUFArray) and tokens_ref.element_type == 8 else []
    tokenizer = {
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "tokens": len(tokens_ref) if isinstance(tokens_ref, GGUFArray) else 0,
        "merges": len(meta["tokenizer.ggml.merges"]) if isinstance(meta.get("tokenizer.ggml.merges"), GGUFArray) else 0,
        **{role: _token_label(tokens, token_id) for role, token_id in roles.items()},
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token"),
        "chat_template": "yes" if meta.get("tokenizer.chat_template") else "no",
    }
    recipe = None
    if "edgeai.recipe" in meta:
        try:
            recipe = json.loads(str(meta["edgeai.recipe"]))
        except json.JSONDecodeError:
            recipe = {"raw": meta["edgeai.recipe"]}
        if not isinstance(recipe, dict):
            recipe = {"raw": meta["edgeai.recipe"]}
        recipe["source_sha256"] = meta.get("edgeai.source.sha256")
    other = {k: shown(v) for k, v in meta.items()
             if k.startswith("general.") and k not in ("general.architecture", "general.name")}
    return ArtifactSummary(Path(path), arch, str(meta.get("general.name", "")), hparams, types, tokenizer, recipe, other)


def _token_label(tokens: list, token_id: object) -> str:
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return f"{token_id} {tokens[token_id]!r}"
    return str(token_id)


def inspect(path: str | Path) -> ArtifactSummary:
    """Summarise an artifact (a GGUF file for now)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return describe_gguf(path)
    raise CheckpointError(f"{path} is not a .gguf file; edgeai inspect reads GGUF files")
