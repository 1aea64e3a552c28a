"""One declarative spec per architecture family: the name table from checkpoint names to GGUF
names (the project's internal names), the hyper-parameters, and each family's quirks.

The one low module of architecture facts (rope style, q/k norm, MoE spec, hyper-parameters from
a GGUF header): converters, quant and runtimes all import it, and it imports none of them.
Translation from checkpoint names happens here and nowhere else. A spec says, for a given
config, exactly which GGUF tensors must exist and with which shapes (numpy order, [out, in]);
the converter fails loudly on anything missing, unexpected or misshapen.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from edgeai.errors import CheckpointError, UnsupportedArchitectureError

log = logging.getLogger(__name__)


class RopeStyle(enum.Enum):
    """How llama.cpp pairs head dimensions in RoPE for an architecture."""

    NORM = "norm"  # adjacent pairs (x0,x1): HF q/k rows are permuted when written
    NEOX = "neox"  # halves (x_i, x_{i+d/2}): HF layout kept as is


class FFNActivation(enum.Enum):
    """The gate's activation in the gated feed-forward: act(gate(x)) * up(x)."""

    SILU = "silu"  # SwiGLU (Llama, Qwen, the MoE families)
    GELU_TANH = "gelu_tanh"  # GeGLU with the tanh approximation (Gemma: gelu_pytorch_tanh)
    # gpt-oss's experts: g = min(gate, limit), u = clamp(up, -limit, limit), g * sigmoid(alpha * g) * (u + 1),
    # with llama.cpp's fixed alpha and limit (SWIGLU_OAI below); llama.cpp's graph reads neither from the file
    SWIGLU_OAI = "swiglu_oai"


SWIGLU_OAI = (1.702, 7.0)  # (alpha, limit) of llama.cpp's ggml_swiglu_oai in its gpt-oss graph
YARN_BETAS = (32.0, 1.0)  # (beta_fast, beta_slow) llama.cpp uses where an architecture reads no yarn keys


class QKNorm(enum.Enum):
    NONE = "none"
    PER_HEAD = "per_head"  # RMSNorm over head_dim, weight [head_dim] (Qwen3)
    FULL = "full"  # RMSNorm over the whole projection, weight [n_head * head_dim] (OLMoE)


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters read from config.json, under the names the GGUF metadata uses."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rope_theta: float
    rms_eps: float
    rope_scaling: Mapping[str, object] | None
    tie_embeddings: bool
    attention_bias: bool
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    norm_topk_prob: bool | None = None
    # interleaved sliding-window attention (Gemma 3): local layers attend to the last `sliding_window`
    # positions; layer il is local when il % swa_pattern < swa_pattern - 1 (llama.cpp's rule: every
    # swa_pattern-th layer is global). 0: every layer is global.
    sliding_window: int = 0
    swa_pattern: int = 0
    rope_theta_swa: float = 0.0  # the local layers' rotary base (unscaled); 0 without sliding windows
    final_logit_softcap: float = 0.0  # logits <- c * tanh(logits / c); 0: none


# Bounds on each hyper-parameter (HParams field -> smallest, largest). The largest are far above any
# released model (about 128 layers, hidden size 16384, 256k-token vocabularies, 10M-position
# contexts, 256 experts), so a value past them is a corrupt or hostile file, refused before any
# work is sized by it: 10^12 layers used to plan for minutes and gigabytes before "missing tensor".
HPARAM_BOUNDS: dict[str, tuple[int, int]] = {
    "n_vocab": (1, 2**24),
    "n_embd": (1, 2**17),
    "n_layer": (1, 2**12),
    "n_ff": (0, 2**20),
    "n_head": (1, 2**12),
    "n_head_kv": (1, 2**12),
    "head_dim": (1, 2**12),
    "n_ctx_train": (1, 2**27),
    "n_expert": (0, 2**12),
    "n_expert_used": (0, 2**12),
    "n_ff_exp": (0, 2**20),
    "n_ff_shexp": (0, 2**20),
    "sliding_window": (0, 2**27),
    "swa_pattern": (0, 2**12),
}


def whole_number(source: str, key: str, value: object, field: str) -> int:
    """`value` of `key` (in the file `source`) as an int within HPARAM_BOUNDS[field]; else a
    CheckpointError naming the file, the key, the value and the range."""
    lo, hi = HPARAM_BOUNDS[field]
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and lo <= value <= hi:
        return int(value)
    what = "outside" if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else \
        f"not a whole number ({type(value).__name__}) in"
    raise CheckpointError(f"{source}: {key} is {value!r:.80}, {what} {lo}..{hi:,}, the range a model can have. "
                          "The file is corrupt or not a model's; fix the value or get the file again")


def is_local_layer(hp: HParams, il: int) -> bool:
    """Whether layer `il` is a sliding-window (local) layer: llama.cpp's set_swa_pattern(n)."""
    if hp.sliding_window <= 0:
        return False
    return hp.swa_pattern == 0 or il % hp.swa_pattern < hp.swa_pattern - 1


def swa_pattern_of(local: list[bool]) -> int | None:
    """The n of llama.cpp's rule (layer il local iff il % n < n - 1) that gives exactly `local`
    (one flag per layer), else None. All local: 0; none local: 1."""
    n_layer = len(local)
    for n in [0, *range(1, n_layer + 2)]:
        if all((n == 0 or il % n < n - 1) == flag for il, flag in enumerate(local)):
            return n
    return None


def gemma3_query_scale_dim(hp: HParams) -> int:
    """The query_pre_attn_scalar llama.cpp's gemma3 graph assumes (the GGUF has no key for it):
    n_embd / n_head for its 62-layer (27B) type, head_dim for every other size (llama-model.cpp,
    after gemma_pytorch's config). Queries are scaled by its inverse square root."""
    return hp.n_embd // hp.n_head if hp.n_layer == 62 else hp.head_dim


def positive_real(source: str, key: str, value: object) -> float:
    """`value` of `key` as a finite float > 0 (rope_theta, rms_norm_eps), else a CheckpointError naming it."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
            and math.isfinite(value) and value > 0:
        return float(value)
    raise CheckpointError(f"{source}: {key} is {value!r:.80}; it must be a finite number > 0. "
                          "The file is corrupt; fix the value or get the file again")


@dataclass(frozen=True)
class MoESpec:
    """What llama.cpp's graph for this architecture does with experts (fixed there, not read from the file)."""

    renormalizes_top_k: bool
    shared_expert: bool
    # checkpoint names, relative to "model.layers.{bid}."
    router: str
    expert: str  # with {xid} and {proj}
    proj_names: Mapping[str, str]  # gguf role (gate/up/down) -> checkpoint projection name
    # gpt-oss: all experts in one tensor per projection, "in" before "out" (x @ W): `expert` names
    # gate_up_proj [n_expert, n_embd, 2 * n_ff_exp] (gate and up in alternate columns) and down_proj
    # [n_expert, n_ff_exp, n_embd], each with a `_bias`; the router has a bias too. OpenAI's own
    # checkpoints ship both MXFP4-encoded, out before in (`converters.sources.MXFP4Pairs`)
    fused: bool = False


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its GGUF name, numpy-order shape, and where its data comes from.

    `sources` has one checkpoint name, or (stacked experts) one per expert, in expert order.
    """

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    generated: Callable[[], np.ndarray] | None = None  # for tensors computed from the config (rope_freqs)
    source_shape: tuple[int, ...] | None = None  # each source's shape, where it is not `shape` (or shape[1:])
    # for a source shipped block-encoded (MXFP4 `_blocks`/`_scales`, rows = outputs): which of its
    # [n_expert, rows, ...] rows this tensor takes, as `transform` takes them from the float layout
    block_rows: Callable[[np.ndarray], np.ndarray] | None = None

    def expected_source_shape(self) -> tuple[int, ...]:
        if self.source_shape is not None:
            return self.source_shape
        return self.shape[1:] if len(self.sources) > 1 else self.shape


# Checkpoint names that carry no weights llama.cpp needs (buffers some exporters save).
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ArchSpec:
    family: str
    hf_architectures: tuple[str, ...]
    gguf_arch: str
    rope: RopeStyle
    qk_norm: QKNorm = QKNorm.NONE
    always_bias: bool = False  # q/k/v biases always present (Qwen2)
    output_required: bool = False  # llama.cpp does not fall back to token_embd for output
    moe: MoESpec | None = None
    checks: tuple[Callable[["HParams"], str | None], ...] = field(default=())
    # Gemma's layer: the gate's activation; norms after attention and after the feed-forward too
    # ("sandwich"), whose checkpoint names differ from Llama's; the embedding scaled by sqrt(n_embd);
    # interleaved sliding-window layers with their own rotary base
    ffn_act: FFNActivation = FFNActivation.SILU
    sandwich_norms: bool = False
    scaled_embedding: bool = False
    # the dimension d whose 1/sqrt(d) scales the queries, where it is not head_dim (the GGUF has no key)
    query_scale_dim: Callable[["HParams"], int] | None = None
    swa_pattern_default: int | None = None  # llama.cpp's pattern when a GGUF gives none; None: no sliding windows
    # added to every RMSNorm weight when converting: Gemma's checkpoints store w - 1 (its norm
    # multiplies by 1 + w); GGUF stores the factor itself, as llama.cpp's converter writes it
    norm_weight_offset: float = 0.0
    chat_template: str | None = None  # the family's chat format, for GGUF files that carry none
    # gpt-oss: a learned logit per head joining each softmax's denominator (attn_sinks), a bias on the
    # attention output, the pre-FFN norm under llama.cpp's name for it in this graph, and sliding-window
    # layers that rotate exactly as the full ones (no base of their own, the same scaling)
    attn_sinks: bool = False
    attn_output_bias: bool = False
    ffn_norm_gguf: str = "ffn_norm"
    swa_own_rope: bool = True

    # ---- hyper-parameters -------------------------------------------------------------------
    def hparams(self, config: Mapping[str, object], config_path: str) -> HParams:
        """Read the config, failing with the missing or invalid key's name (`whole_number`)."""

        def need(*keys: str) -> tuple[str, object]:
            for key in keys:
                if config.get(key) is not None:
                    return key, config[key]
            raise CheckpointError(f"{config_path} has no {keys[0]!r}, which a {self.family} model needs")

        def maybe(default: object, *keys: str) -> tuple[str, object]:
            for key in keys:
                if config.get(key) is not None:
                    return key, config[key]
            return keys[0], default

        def count(field: str, found: tuple[str, object]) -> int:
            return whole_number(config_path, found[0], found[1], field)

        def real(found: tuple[str, object]) -> float:
            return positive_real(config_path, *found)

        n_embd = count("n_embd", need("hidden_size"))
        n_head = count("n_head", need("num_attention_heads"))
        rope_params = config.get("rope_parameters") or {}
        legacy_scaling = config.get("rope_scaling") or {}
        if not isinstance(rope_params, Mapping) or not isinstance(legacy_scaling, Mapping):
            raise CheckpointError(f"{config_path}: rope_parameters / rope_scaling must be JSON objects")
        local_rope = None
        if self.swa_pattern_default is not None and isinstance(rope_params.get("full_attention"), Mapping):
            # transformers 5 keeps one rotary setting per layer type
            local_rope = rope_params.get("sliding_attention") or {}
            rope_params = rope_params["full_attention"]
        scaling = {**legacy_scaling, **rope_params}
        rope_theta = real(("rope_theta", scaling["rope_theta"]) if "rope_theta" in scaling
                          else maybe(10000.0, "rope_theta"))
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        hp = HParams(
            n_vocab=count("n_vocab", need("vocab_size")),
            n_embd=n_embd,
            n_layer=count("n_layer", need("num_hidden_layers")),
            n_ff=count("n_ff", need("intermediate_size")),
            n_head=n_head,
            n_head_kv=count("n_head_kv", maybe(n_head, "num_key_value_heads")),
            head_dim=count("head_dim", maybe(n_embd // n_head, "head_dim")),
            n_ctx_train=count("n_ctx_train", maybe(2048, "max_position_embeddings")),
            rope_theta=rope_theta,
            rms_eps=real(maybe(1e-6, "rms_norm_eps")),
            rope_scaling=None if rope_type in (None, "default") else {**scaling, "rope_type": rope_type},
            tie_embeddings=bool(maybe(False, "tie_word_embeddings")[1]),
            attention_bias=self.always_bias or bool(maybe(False, "attention_bias", "qkv_bias")[1]),
            n_expert=count("n_expert", maybe(0, "num_local_experts", "num_experts")) if self.moe else 0,
            n_expert_used=count("n_expert_used", maybe(0, "num_experts_per_tok")) if self.moe else 0,
            n_ff_exp=count("n_ff_exp", maybe(config.get("intermediate_size"), "moe_intermediate_size")) if self.moe else 0,
            n_ff_shexp=count("n_ff_shexp", maybe(0, "shared_expert_intermediate_size")) if self.moe else 0,
            norm_topk_prob=(bool(maybe(True, "norm_topk_prob")[1]) if self.moe else None),
        )
        if self.swa_pattern_default is not None:
            hp = self._sliding_window_hparams(hp, config, config_path, local_rope)
        self._check(hp, config, config_path)
        return hp

    def _sliding_window_hparams(self, hp: HParams, config: Mapping[str, object], config_path: str,
                                local_rope: Mapping[str, object] | None) -> HParams:
        """The Gemma 3 keys of a config (window, layer pattern, local rotary base, logit cap), checked
        against what llama.cpp's gemma3 graph computes; a CheckpointError names what it cannot."""
        problems = []
        if not self.swa_own_rope:  # the local layers rotate as the full ones
            theta_key, theta = "rope_theta", hp.rope_theta
        elif local_rope is not None:
            if local_rope.get("rope_type", "default") != "default":
                problems.append(f"rope_parameters.sliding_attention.rope_type is {local_rope.get('rope_type')!r}; "
                                "llama.cpp rotates local layers without scaling")
            theta_key, theta = "rope_parameters.sliding_attention.rope_theta", local_rope.get("rope_theta", 10000.0)
        else:
            theta_key, theta = "rope_local_base_freq", config.get("rope_local_base_freq", 10000.0)
        rope_theta_swa = positive_real(config_path, theta_key, theta)
        layer_types = config.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list) or len(layer_types) != hp.n_layer or \
                    not set(layer_types) <= {"sliding_attention", "full_attention"}:
                raise CheckpointError(f"{config_path}: layer_types must list 'sliding_attention' or 'full_attention' "
                                      f"for each of the {hp.n_layer} layers")
            local = [t == "sliding_attention" for t in layer_types]
        else:
            key = next((k for k in ("sliding_window_pattern", "_sliding_window_pattern") if config.get(k) is not None),
                       "sliding_window_pattern")
            n = whole_number(config_path, key, config.get(key, self.swa_pattern_default), "swa_pattern")
            local = [n == 0 or i % n < n - 1 for i in range(hp.n_layer)]
        pattern = swa_pattern_of(local)
        if pattern is None:
            problems.append(f"layer_types {['L' if x else 'G' for x in local]} (L: sliding, G: full) is not a periodic "
                            f"pattern with every n-th layer global, the one llama.cpp's {self.gguf_arch} graph reads")
        window = whole_number(config_path, "sliding_window", config.get("sliding_window", 0), "sliding_window") \
            if any(local) else 0
        if any(local) and window == 0:
            problems.append("sliding_window is 0 but some layers are sliding-window layers")
        if config.get("attn_logit_softcapping") is not None:
            problems.append(f"attn_logit_softcapping is set; llama.cpp's {self.gguf_arch} graph ignores it")
        if config.get("use_bidirectional_attention"):
            problems.append("use_bidirectional_attention is set (an embedding model); this converts causal language models")
        activation = config.get("hidden_activation") or config.get("hidden_act")
        if self.ffn_act is FFNActivation.GELU_TANH and activation not in ("gelu_pytorch_tanh", "gelu_new"):
            problems.append(f"hidden_activation {activation!r} is not the tanh GELU llama.cpp's gemma3 graph computes")
        expected = self.query_scale_dim(hp) if self.query_scale_dim else hp.head_dim
        scalar = config.get("query_pre_attn_scalar", expected)
        if scalar != expected:
            problems.append(f"query_pre_attn_scalar is {scalar!r}, but llama.cpp's {self.gguf_arch} graph scales queries by "
                            f"1/sqrt({expected}) for this shape (it stores no scale in the file)")
        cap = config.get("final_logit_softcapping") or 0.0
        if cap:
            cap = positive_real(config_path, "final_logit_softcapping", cap)
        if problems:
            raise CheckpointError(f"{config_path}: cannot convert this {self.family} checkpoint: " + "; ".join(problems))
        return dataclasses.replace(hp, sliding_window=window, swa_pattern=pattern if window else 0,
                                   rope_theta_swa=rope_theta_swa, final_logit_softcap=float(cap))

    def _check(self, hp: HParams, config: Mapping[str, object], config_path: str) -> None:
        problems = [p for p in (check(hp) for check in self.checks) if p]
        if hp.n_head_kv <= 0 or hp.n_head % hp.n_head_kv:
            problems.append(f"num_attention_heads {hp.n_head} is not a multiple of num_key_value_heads {hp.n_head_kv}")
        if self.moe:
            if hp.n_expert <= 0 or not 0 < hp.n_expert_used <= hp.n_expert:
                problems.append(
                    f"expert counts are invalid ({hp.n_expert} experts, {hp.n_expert_used} used per token)"
                )
            if hp.norm_topk_prob != self.moe.renormalizes_top_k:
                problems.append(
                    f"norm_topk_prob={hp.norm_topk_prob}, but llama.cpp's {self.gguf_arch} graph always "
                    f"{'renormalizes' if self.moe.renormalizes_top_k else 'keeps'} the top-k routing weights; "
                    "this checkpoint would compute different outputs there"
                )
            if self.ffn_act is FFNActivation.SWIGLU_OAI:
                got = (config.get("swiglu_alpha", SWIGLU_OAI[0]), config.get("swiglu_limit", SWIGLU_OAI[1]))
                if tuple(float(v) for v in got) != SWIGLU_OAI:
                    problems.append(f"swiglu_alpha, swiglu_limit are {got}; llama.cpp's {self.gguf_arch} graph computes "
                                    f"with {SWIGLU_OAI} (the file stores no such key)")
            if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1) or 1) != 1:
                problems.append("dense layers between MoE layers (mlp_only_layers / decoder_sparse_step) are not supported")
        if hp.head_dim % 2:
            problems.append(f"head_dim {hp.head_dim} is odd; rotary position embeddings rotate pairs of dimensions")
        scaling = hp.rope_scaling or {}
        rope_type = scaling.get("rope_type")
        if rope_type not in (None, "linear", "llama3", "yarn"):
            problems.append(f"rope_type {rope_type!r} is not supported yet (supported: default, linear, llama3, yarn)")
        elif rope_type is not None:
            positive_real(config_path, "rope_scaling.factor", scaling.get("factor"))
            if rope_type == "yarn":
                problems += _yarn_problems(scaling, config_path, self.gguf_arch)
            if rope_type == "llama3" and not float(scaling.get("high_freq_factor", 4.0)) > float(
                    scaling.get("low_freq_factor", 1.0)):
                problems.append("rope_scaling's high_freq_factor must be larger than its low_freq_factor (llama3)")
        if problems:
            raise CheckpointError(f"{config_path}: cannot convert this {self.family} checkpoint: " + "; ".join(problems))

    # ---- GGUF metadata ----------------------------------------------------------------------
    def gguf_kv(self, hp: HParams) -> dict[str, object]:
        """Architecture keys, without the `{arch}.` prefix. Python ints are written as uint32, floats as float32."""
        kv: dict[str, object] = {
            "context_length": hp.n_ctx_train,
            "embedding_length": hp.n_embd,
            "block_count": hp.n_layer,
            "feed_forward_length": hp.n_ff,
            "attention.head_count": hp.n_head,
            "attention.head_count_kv": hp.n_head_kv,
            "attention.key_length": hp.head_dim,
            "attention.value_length": hp.head_dim,
            "attention.layer_norm_rms_epsilon": hp.rms_eps,
            "rope.freq_base": hp.rope_theta,
            "rope.dimension_count": hp.head_dim,
            "vocab_size": hp.n_vocab,
        }
        if self.moe:
            kv["expert_count"] = hp.n_expert
            kv["expert_used_count"] = hp.n_expert_used
            kv["expert_feed_forward_length"] = hp.n_ff_exp
            if self.moe.shared_expert:
                kv["expert_shared_feed_forward_length"] = hp.n_ff_shexp
        if self.swa_pattern_default is not None:
            kv["rope.freq_base_swa"] = hp.rope_theta_swa
            if hp.sliding_window:
                kv["attention.sliding_window"] = hp.sliding_window
                kv["attention.sliding_window_pattern"] = hp.swa_pattern
            if hp.final_logit_softcap:
                kv["final_logit_softcapping"] = hp.final_logit_softcap
        if self.swa_pattern_default is not None and not self.swa_own_rope:
            del kv["rope.freq_base_swa"]  # llama.cpp's gpt-oss graph takes rope.freq_base when the key is absent
        scaling = hp.rope_scaling or {}
        if scaling.get("rope_type") in ("linear", "yarn"):
            kv["rope.scaling.type"] = scaling["rope_type"]
            kv["rope.scaling.factor"] = float(scaling["factor"])
        if scaling.get("rope_type") == "yarn":
            kv["rope.scaling.original_context_length"] = int(scaling["original_max_position_embeddings"])
        return kv

    # ---- tensors ----------------------------------------------------------------------------
    def plan(self, hp: HParams) -> list[PlannedTensor]:
        """Every GGUF tensor this config needs, in file order, with its checkpoint sources."""
        q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        out: list[PlannedTensor] = [PlannedTensor("token_embd.weight", (hp.n_vocab, hp.n_embd), ("model.embed_tokens.weight",))]
        norm = _add(self.norm_weight_offset) if self.norm_weight_offset else None  # RMSNorm weights
        rope_freqs = llama3_rope_factors(hp)
        if rope_freqs is not None:
            out.append(PlannedTensor("rope_freqs.weight", rope_freqs.shape, (), generated=lambda: rope_freqs))
        for bid in range(hp.n_layer):
            layer = f"model.layers.{bid}."
            blk = f"blk.{bid}."

            def one(name: str, shape: tuple[int, ...], source: str, transform=None, source_shape=None) -> None:
                out.append(PlannedTensor(blk + name, shape, (layer + source,), transform, source_shape=source_shape))

            one("attn_norm.weight", (hp.n_embd,), "input_layernorm.weight", norm)
            permute_q = _permute_rows(hp.n_head) if self.rope is RopeStyle.NORM else None
            permute_k = _permute_rows(hp.n_head_kv) if self.rope is RopeStyle.NORM else None
            one("attn_q.weight", (q_dim, hp.n_embd), "self_attn.q_proj.weight", permute_q)
            one("attn_k.weight", (kv_dim, hp.n_embd), "self_attn.k_proj.weight", permute_k)
            one("attn_v.weight", (kv_dim, hp.n_embd), "self_attn.v_proj.weight")
            if hp.attention_bias:
                one("attn_q.bias", (q_dim,), "self_attn.q_proj.bias", permute_q)
                one("attn_k.bias", (kv_dim,), "self_attn.k_proj.bias", permute_k)
                one("attn_v.bias", (kv_dim,), "self_attn.v_proj.bias")
            one("attn_output.weight", (hp.n_embd, q_dim), "self_attn.o_proj.weight")
            if self.attn_output_bias:
                one("attn_output.bias", (hp.n_embd,), "self_attn.o_proj.bias")
            if self.attn_sinks:
                one("attn_sinks.weight", (hp.n_head,), "self_attn.sinks")
            if self.qk_norm is QKNorm.PER_HEAD:
                one("attn_q_norm.weight", (hp.head_dim,), "self_attn.q_norm.weight", norm)
                one("attn_k_norm.weight", (hp.head_dim,), "self_attn.k_norm.weight", norm)
            elif self.qk_norm is QKNorm.FULL:
                one("attn_q_norm.weight", (q_dim,), "self_attn.q_norm.weight", norm)
                one("attn_k_norm.weight", (kv_dim,), "self_attn.k_norm.weight", norm)
            if self.sandwich_norms:  # Gemma: post_attention_layernorm is the norm *after* attention
                one("post_attention_norm.weight", (hp.n_embd,), "post_attention_layernorm.weight", norm)
                one("ffn_norm.weight", (hp.n_embd,), "pre_feedforward_layernorm.weight", norm)
                one("post_ffw_norm.weight", (hp.n_embd,), "post_feedforward_layernorm.weight", norm)
            else:
                one(f"{self.ffn_norm_gguf}.weight", (hp.n_embd,), "post_attention_layernorm.weight")
            if self.moe is None:
                one("ffn_gate.weight", (hp.n_ff, hp.n_embd), "mlp.gate_proj.weight")
                one("ffn_up.weight", (hp.n_ff, hp.n_embd), "mlp.up_proj.weight")
                one("ffn_down.weight", (hp.n_embd, hp.n_ff), "mlp.down_proj.weight")
                continue
            moe = self.moe
            one("ffn_gate_inp.weight", (hp.n_expert, hp.n_embd), moe.router)
            if moe.fused:
                out += _fused_experts(hp, layer, blk, moe)
                continue
            for role, shape in (
                ("gate", (hp.n_expert, hp.n_ff_exp, hp.n_embd)),
                ("up", (hp.n_expert, hp.n_ff_exp, hp.n_embd)),
                ("down", (hp.n_expert, hp.n_embd, hp.n_ff_exp)),
            ):
                sources = tuple(
                    layer + moe.expert.format(xid=x, proj=moe.proj_names[role]) for x in range(hp.n_expert)
                )
                out.append(PlannedTensor(f"{blk}ffn_{role}_exps.weight", shape, sources))
            if moe.shared_expert:
                one("ffn_gate_inp_shexp.weight", (hp.n_embd,), "mlp.shared_expert_gate.weight", _flatten, (1, hp.n_embd))
                one("ffn_gate_shexp.weight", (hp.n_ff_shexp, hp.n_embd), "mlp.shared_expert.gate_proj.weight")
                one("ffn_up_shexp.weight", (hp.n_ff_shexp, hp.n_embd), "mlp.shared_expert.up_proj.weight")
                one("ffn_down_shexp.weight", (hp.n_embd, hp.n_ff_shexp), "mlp.shared_expert.down_proj.weight")
        out.append(PlannedTensor("output_norm.weight", (hp.n_embd,), ("model.norm.weight",), norm))
        if not hp.tie_embeddings:
            out.append(PlannedTensor("output.weight", (hp.n_vocab, hp.n_embd), ("lm_head.weight",)))
        elif self.output_required:  # tied, but this graph has no fallback to token_embd: write a copy
            out.append(PlannedTensor("output.weight", (hp.n_vocab, hp.n_embd), ("model.embed_tokens.weight",)))
        return out

    def used_sources(self, planned: list[PlannedTensor], available: set[str]) -> set[str]:
        """Checkpoint tensors the plan reads, plus those it may skip (tied lm_head, ignored buffers)."""
        used = {s for p in planned for s in p.sources}
        skippable = {n for n in available if IGNORED.match(n)}
        if "lm_head.weight" in available and "lm_head.weight" not in used:
            skippable.add("lm_head.weight")  # tied to the embedding: llama.cpp reuses token_embd
        return used | skippable


def _permute_rows(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF rotates the two halves of each head; llama.cpp's NORM RoPE rotates adjacent pairs.

    Reorder each head's rows from [x_0..x_{d/2-1}, y_0..y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...].
    Works for weights [n_head*d, in] and biases [n_head*d].
    """

    def permute(w: np.ndarray) -> np.ndarray:
        rows = w.shape[0]
        return (
            w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    return permute


def _fused_experts(hp: HParams, layer: str, blk: str, moe: MoESpec) -> list[PlannedTensor]:
    """gpt-oss's stacked experts (MoESpec.fused) as llama.cpp's gate/up/down [n_expert, out, in] and
    their biases [n_expert, out]: gate and up are the even and odd columns of gate_up_proj."""
    E, F, H = hp.n_expert, hp.n_ff_exp, hp.n_embd
    gate_up, down = layer + moe.expert.format(proj="gate_up_proj"), layer + moe.expert.format(proj="down_proj")
    router_bias = layer + moe.router.removesuffix("weight") + "bias"

    def columns(first: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda w: w[..., first::2].transpose(0, 2, 1)

    def rows(first: int) -> Callable[[np.ndarray], np.ndarray]:  # the same, on shipped MXFP4 [E, 2F, ...]
        return lambda a: a[:, first::2]

    def bias_columns(first: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda b: b[..., first::2]

    return [
        PlannedTensor(f"{blk}ffn_gate_inp.bias", (E,), (router_bias,)),
        PlannedTensor(f"{blk}ffn_gate_exps.weight", (E, F, H), (gate_up,), columns(0), source_shape=(E, H, 2 * F),
                      block_rows=rows(0)),
        PlannedTensor(f"{blk}ffn_up_exps.weight", (E, F, H), (gate_up,), columns(1), source_shape=(E, H, 2 * F),
                      block_rows=rows(1)),
        PlannedTensor(f"{blk}ffn_down_exps.weight", (E, H, F), (down,), lambda w: w.transpose(0, 2, 1), source_shape=(E, F, H),
                      block_rows=_same),
        PlannedTensor(f"{blk}ffn_gate_exps.bias", (E, F), (gate_up + "_bias",), bias_columns(0), source_shape=(E, 2 * F)),
        PlannedTensor(f"{blk}ffn_up_exps.bias", (E, F), (gate_up + "_bias",), bias_columns(1), source_shape=(E, 2 * F)),
        PlannedTensor(f"{blk}ffn_down_exps.bias", (E, H), (down + "_bias",)),
    ]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _flatten(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1)


def _add(offset: float) -> Callable[[np.ndarray], np.ndarray]:
    def add(w: np.ndarray) -> np.ndarray:
        return w + np.float32(offset)

    return add


def _yarn_problems(scaling: Mapping[str, object], config_path: str, arch: str) -> list[str]:
    """What in a YaRN rope_scaling llama.cpp would compute differently: it reads the factor and the
    original context from the file, takes beta_fast 32 and beta_slow 1, derives the attention factor
    (0.1 ln(factor) + 1) itself, and always rounds the correction range outwards to whole dimensions."""
    problems = []
    if not isinstance(scaling.get("original_max_position_embeddings"), int) or \
            scaling["original_max_position_embeddings"] <= 0:
        problems.append("rope_scaling (yarn) needs original_max_position_embeddings, a whole number > 0")
    betas = (scaling.get("beta_fast") or YARN_BETAS[0], scaling.get("beta_slow") or YARN_BETAS[1])
    if tuple(float(b) for b in betas) != YARN_BETAS:
        problems.append(f"rope_scaling's beta_fast, beta_slow are {betas}; llama.cpp's {arch} graph uses {YARN_BETAS}")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            problems.append(f"rope_scaling.{key} is set; llama.cpp derives the YaRN attention factor from the factor alone")
    if scaling.get("truncate") is False:
        # gpt-oss's own setting: its correction range is [8.09, 17.4] (20b), llama.cpp's [8, 18]; the two
        # rotations differ by a fraction of a percent in a few middle frequencies
        log.warning("%s: rope_scaling.truncate is false, but llama.cpp (and edgeai, computing as llama.cpp does) "
                    "round YaRN's correction range to whole dimensions; rotations differ slightly from the checkpoint's",
                    config_path)
    return problems


def llama3_rope_factors(hp: HParams) -> np.ndarray | None:
    """Llama 3.1's frequency-dependent RoPE scaling as llama.cpp takes it: a `rope_freqs` tensor of
    per-frequency divisors, shape [head_dim/2]. None for other rope types."""
    scaling = hp.rope_scaling or {}
    if scaling.get("rope_type") != "llama3":
        return None
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    # smooth=0 (long wavelengths) divides by `factor`; smooth=1 (short ones) leaves the frequency alone
    return (1.0 / ((1.0 - smooth) / factor + smooth)).astype(np.float32)


def _full_attention_width(family: str) -> Callable[[HParams], str | None]:
    def check(hp: HParams) -> str | None:
        if hp.n_head * hp.head_dim != hp.n_embd:
            return (
                f"llama.cpp's {family} graph needs num_attention_heads * head_dim == hidden_size "
                f"({hp.n_head} * {hp.head_dim} != {hp.n_embd})"
            )
        return None

    return check


def _olmoe_kv_heads(hp: HParams) -> str | None:
    if hp.n_head_kv != hp.n_head:
        return f"llama.cpp's olmoe graph needs num_key_value_heads == num_attention_heads ({hp.n_head_kv} != {hp.n_head})"
    return None


# Gemma 3's chat format (its instruction-tuned checkpoints' template, text parts only): a system
# message joins the first user turn; the assistant's role is "model". For files that carry no template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def family_chat_template(gguf_arch: str) -> str | None:
    """The chat template of an architecture family whose files may come without one (None: no default)."""
    return next((s.chat_template for s in SPECS if s.gguf_arch == gguf_arch and s.chat_template), None)


_QWEN_EXPERTS = dict(expert="mlp.experts.{xid}.{proj}_proj.weight", proj_names={"gate": "gate", "up": "up", "down": "down"})

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="Llama",
        hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
        gguf_arch="llama",
        rope=RopeStyle.NORM,
    ),
    ArchSpec(
        family="Qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        gguf_arch="qwen2",
        rope=RopeStyle.NEOX,
        always_bias=True,
        checks=(_full_attention_width("qwen2"),),
    ),
    ArchSpec(
        family="Qwen3",
        hf_architectures=("Qwen3ForCausalLM",),
        gguf_arch="qwen3",
        rope=RopeStyle.NEOX,
        qk_norm=QKNorm.PER_HEAD,
    ),
    ArchSpec(
        family="Gemma 3",
        hf_architectures=("Gemma3ForCausalLM",),
        gguf_arch="gemma3",
        rope=RopeStyle.NEOX,
        qk_norm=QKNorm.PER_HEAD,
        ffn_act=FFNActivation.GELU_TANH,
        sandwich_norms=True,
        scaled_embedding=True,
        query_scale_dim=gemma3_query_scale_dim,
        swa_pattern_default=6,  # llama.cpp's gemma3 loader: every 6th layer global when the file says nothing
        norm_weight_offset=1.0,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    ),
    ArchSpec(
        family="gpt-oss",
        hf_architectures=("GptOssForCausalLM",),
        gguf_arch="gpt-oss",
        rope=RopeStyle.NEOX,
        always_bias=True,
        output_required=True,
        moe=MoESpec(renormalizes_top_k=True, shared_expert=False, router="mlp.router.weight",
                    expert="mlp.experts.{proj}", proj_names={}, fused=True),
        swa_pattern_default=2,  # llama.cpp's gpt-oss loader: every other layer (the first) sliding
        swa_own_rope=False,
        attn_sinks=True,
        attn_output_bias=True,
        ffn_norm_gguf="post_attention_norm",
        ffn_act=FFNActivation.SWIGLU_OAI,
    ),
    ArchSpec(
        family="Mixtral",
        hf_architectures=("MixtralForCausalLM",),
        gguf_arch="llama",
        rope=RopeStyle.NORM,
        moe=MoESpec(
            renormalizes_top_k=True,
            shared_expert=False,
            router="block_sparse_moe.gate.weight",
            expert="block_sparse_moe.experts.{xid}.{proj}.weight",
            proj_names={"gate": "w1", "up": "w3", "down": "w2"},
        ),
    ),
    ArchSpec(
        family="Qwen2-MoE",
        hf_architectures=("Qwen2MoeForCausalLM",),
        gguf_arch="qwen2moe",
        rope=RopeStyle.NEOX,
        always_bias=True,
        output_required=True,
        moe=MoESpec(renormalizes_top_k=False, shared_expert=True, router="mlp.gate.weight", **_QWEN_EXPERTS),
        checks=(_full_attention_width("qwen2moe"),),
    ),
    ArchSpec(
        family="Qwen3-MoE",
        hf_architectures=("Qwen3MoeForCausalLM",),
        gguf_arch="qwen3moe",
        rope=RopeStyle.NEOX,
        qk_norm=QKNorm.PER_HEAD,
        moe=MoESpec(renormalizes_top_k=True, shared_expert=False, router="mlp.gate.weight", **_QWEN_EXPERTS),
    ),
    ArchSpec(
        family="OLMoE",
        hf_architectures=("OlmoeForCausalLM",),
        gguf_arch="olmoe",
        rope=RopeStyle.NEOX,
        qk_norm=QKNorm.FULL,
        output_required=True,
        moe=MoESpec(renormalizes_top_k=False, shared_expert=False, router="mlp.gate.weight", **_QWEN_EXPERTS),
        checks=(_full_attention_width("olmoe"), _olmoe_kv_heads),
    ),
)


def spec_for(architectures: list[str] | None, config_path: str) -> ArchSpec:
    """The spec for a config's `architectures`; an error lists what is supported."""
    for arch in architectures or ():
        for spec in SPECS:
            if arch in spec.hf_architectures:
                return spec
    supported = ", ".join(a for s in SPECS for a in s.hf_architectures)
    raise UnsupportedArchitectureError(
        f"{config_path}: architecture {', '.join(architectures or ['(none given)'])} is not supported; "
        f"supported: {supported}"
    )


def spec_for_gguf(metadata: Mapping[str, object], path: str) -> ArchSpec:
    """The spec of a GGUF file's architecture (llama with experts is the Mixtral family)."""
    arch = str(metadata.get("general.architecture", ""))
    has_experts = int(metadata.get(f"{arch}.expert_count", 0) or 0) > 0
    for spec in SPECS:
        if spec.gguf_arch == arch and (spec.moe is not None) == has_experts:
            return spec
    supported = ", ".join(sorted({s.gguf_arch for s in SPECS}))
    raise UnsupportedArchitectureError(f"{path}: GGUF architecture {arch!r} is not supported here; supported: {supported}")


def hparams_from_gguf(metadata: Mapping[str, object], spec: ArchSpec, source: str = "GGUF metadata") -> HParams:
    """HParams from a GGUF header (the inverse of `ArchSpec.gguf_kv`); a missing key or a value out
    of HPARAM_BOUNDS is a CheckpointError naming `source` (the file) and the key."""
    a = spec.gguf_arch

    def get(key: str, default: object = None) -> object:
        value = metadata.get(f"{a}.{key}", default)
        if value is None:
            raise CheckpointError(f"{source}: GGUF metadata has no {a}.{key}")
        return value

    def count(field: str, key: str, default: object = None) -> int:
        return whole_number(source, f"{a}.{key}", get(key, default), field)

    def real(key: str, default: float) -> float:
        return positive_real(source, f"{a}.{key}", get(key, default))

    n_embd, n_head = count("n_embd", "embedding_length"), count("n_head", "attention.head_count")
    if metadata.get(f"{a}.vocab_size"):
        n_vocab = count("n_vocab", "vocab_size")
    else:
        n_vocab = whole_number(source, "tokenizer.ggml.tokens (its length)", len(metadata.get("tokenizer.ggml.tokens") or ()),
                               "n_vocab")
    scaling = None
    if metadata.get(f"{a}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": real("rope.scaling.factor", None)}
    elif metadata.get(f"{a}.rope.scaling.type") == "yarn":
        scaling = {"rope_type": "yarn", "factor": real("rope.scaling.factor", None),
                   "original_max_position_embeddings": count("n_ctx_train", "rope.scaling.original_context_length",
                                                             get("context_length", 2048))}
    n_layer = count("n_layer", "block_count")
    window = pattern = 0
    theta_swa = cap = 0.0
    if spec.swa_pattern_default is not None:
        window = count("sliding_window", "attention.sliding_window", 0)
        found = metadata.get(f"{a}.attention.sliding_window_pattern")
        if isinstance(found, (list, tuple, np.ndarray)):  # one flag per layer
            pattern = swa_pattern_of([bool(x) for x in found]) if len(found) == n_layer else None
            if pattern is None:
                raise UnsupportedArchitectureError(
                    f"{source}: {a}.attention.sliding_window_pattern lists a layer pattern other than "
                    "'every n-th layer global', which edgeai does not run")
        else:
            pattern = count("swa_pattern", "attention.sliding_window_pattern", spec.swa_pattern_default)
        pattern = pattern if window else 0
        theta_swa = real("rope.freq_base_swa", 10000.0 if spec.swa_own_rope else real("rope.freq_base", 10000.0))
        if metadata.get(f"{a}.final_logit_softcapping"):
            cap = real("final_logit_softcapping", None)
    return HParams(
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_ff=count("n_ff", "feed_forward_length", 0),
        n_head=n_head,
        n_head_kv=count("n_head_kv", "attention.head_count_kv", n_head),
        head_dim=count("head_dim", "attention.key_length", n_embd // n_head),
        n_ctx_train=count("n_ctx_train", "context_length", 2048),
        rope_theta=real("rope.freq_base", 10000.0),
        rms_eps=real("attention.layer_norm_rms_epsilon", 1e-6),
        rope_scaling=scaling,
        tie_embeddings=False,
        attention_bias=spec.always_bias,
        n_expert=count("n_expert", "expert_count", 0),
        n_expert_used=count("n_expert_used", "expert_used_count", 0),
        n_ff_exp=count("n_ff_exp", "expert_feed_forward_length", 0),
        n_ff_shexp=count("n_ff_shexp", "expert_shared_feed_forward_length", 0),
        norm_topk_prob=spec.moe.renormalizes_top_k if spec.moe else None,
        sliding_window=window,
        swa_pattern=pattern,
        rope_theta_swa=theta_swa,
        final_logit_softcap=cap,
    )
