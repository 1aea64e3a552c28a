"""`edgeai fit`: will a model fit a device, with which split of the memory budget, and how fast?

Memory = resident weights + KV cache (n_ctx positions of its type: f16 by default, `kv_cache=`) + scratch (the engine's compute
buffers, sized for a prefill batch of n_batch tokens). Speed: decode reads every weight once per
token (but only one row of the embedding table, and only the routed experts of an MoE), plus
the KV cache of a half-full context: tokens/s = decode bandwidth / bytes per token, where the
decode bandwidth is the profile's memory bandwidth times the fraction llama.cpp decode was
measured to reach on that device (`decode_bandwidth_fraction`, sourced in the profile).
Experts that do not fit the budget are streamed from storage (cache hit rate = the fraction of
expert bytes that fit, as if routing were uniform).

For a checkpoint, each recipe's exact size comes from the converter's plan (headers only), and
the best recipe that fits is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeai.devices import DeviceProfile
from edgeai.errors import CheckpointError, OptionError
from edgeai.runtimes.base import DEFAULT_N_CTX, KV_ELEMENT_BYTES, kv_cache_type, kv_cache_types

N_BATCH = 512  # the prefill batch the scratch is sized for (the llama.cpp backend's n_batch)
RING_BATCH = 64  # native/src/model.cpp kBatch: a local layer's ring holds its window plus one batch - 1
# native/src/model.hpp kExactRecent: a 4-bit K or V cache also keeps each layer's latest positions in
# f16, in a ring of that plus one batch - 1 rows (and the position each row holds, an int)
EXACT_RECENT = 64
# Buffers besides weights, KV cache and activations (graph, batch, sampler, the Python side):
# measured with llama.cpp on SmolLM2-135M at n_ctx 512, 2048 and 4096 (RSS after a prefill).
ENGINE_OVERHEAD = 16 * 2**20
# Best first: the recipes `edgeai fit` considers for a checkpoint.
RECIPE_ORDER = ("f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0")


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters an estimate needs."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ff: int
    n_ctx_train: int
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int = 0  # Gemma 3's local layers attend to this many positions...
    local_layers: int = 0  # ...and this many layers are local (their KV is a ring)


@dataclass(frozen=True)
class WeightBytes:
    """Tensor bytes by how decode reads them."""

    dense: int  # read whole every token
    experts: int  # all experts (MoE); a token reads n_expert_used / n_expert of them
    embedding: int  # token_embd: one row per token (unless it is also the output matrix, then counted in dense)

    @property
    def total(self) -> int:
        return self.dense + self.experts + self.embedding


@dataclass(frozen=True)
class FitEstimate:
    device: DeviceProfile
    label: str  # the file, or the recipe for a checkpoint
    budget: int
    n_ctx: int
    weights: WeightBytes
    kv_bytes: int
    scratch_bytes: int
    resident_expert_bytes: int  # experts kept in memory (all of them when they fit)
    bytes_per_token_memory: float
    bytes_per_token_storage: float  # streamed expert bytes per token (0 when all are resident)
    decode_tps: float
    kv_cache: str = "f16"  # the KV cache's type (`runtimes.base.kv_cache_type`)

    @property
    def needed(self) -> int:
        """Memory with every weight resident."""
        return self.weights.total + self.kv_bytes + self.scratch_bytes

    @property
    def minimum(self) -> int:
        """Memory with the experts streamed (an MoE); the same as `needed` for a dense model."""
        return self.needed - self.weights.experts if self.weights.experts else self.needed

    @property
    def fits(self) -> bool:
        return self.needed <= self.budget

    @property
    def fits_streaming(self) -> bool:
        return self.minimum <= self.budget

    def to_json(self) -> dict:
        return {"device": self.device.name, "label": self.label, "budget": self.budget, "n_ctx": self.n_ctx,
                "weights": self.weights.total, "dense_weights": self.weights.dense, "expert_weights": self.weights.experts,
                "embedding": self.weights.embedding, "kv_cache": self.kv_bytes, "kv_cache_type": self.kv_cache,
                "scratch": self.scratch_bytes,
                "resident_experts": self.resident_expert_bytes, "needed": self.needed, "minimum": self.minimum,
                "fits": self.fits, "fits_streaming": self.fits_streaming,
                "bytes_per_token": self.bytes_per_token_memory + self.bytes_per_token_storage,
                "decode_tps": self.decode_tps}


def kv_cache_bytes(shape: ModelShape, n_ctx: int, kv_cache: str | None = None) -> int:
    """Bytes of n_ctx positions of a KV cache of type `kv_cache` (None: f16; "q8_0/q4_0": keys q8_0,
    values q4_0), as the native engine allocates them."""
    k, v = kv_cache_types(kv_cache)
    per_position = shape.head_dim_k * KV_ELEMENT_BYTES[k] + shape.head_dim_v * KV_ELEMENT_BYTES[v]
    ring = min(n_ctx, shape.sliding_window + RING_BATCH - 1)
    positions = (shape.n_layer - shape.local_layers) * n_ctx + shape.local_layers * ring
    exact_values = (shape.head_dim_k if k == "q4_0" else 0) + (shape.head_dim_v if v == "q4_0" else 0)
    exact = shape.n_layer * min(n_ctx, EXACT_RECENT + RING_BATCH - 1) * (shape.n_head_kv * exact_values * 2 + 4) if exact_values else 0
    return round(positions * shape.n_head_kv * per_position) + exact


def scratch_bytes(shape: ModelShape, n_ctx: int, n_batch: int = N_BATCH) -> int:
    """Compute buffers for a prefill batch (float32 activations of n_batch positions: FFN gate/up/
    out and a few residual-width buffers; attention runs in tiles, so no [n_ctx, n_batch] scores),
    the logits of one position, and a fixed part for the engine's other buffers."""
    n_batch = min(n_batch, n_ctx)
    activations = 4 * n_batch * (3 * max(shape.n_ff, shape.n_embd) + 6 * shape.n_embd)
    return activations + 2 * 4 * shape.n_vocab + ENGINE_OVERHEAD


def routed_expert_bytes(shape: ModelShape, weights: WeightBytes) -> float:
    """Expert bytes one token reads: the n_expert_used routed experts of every layer."""
    return weights.experts * shape.n_expert_used / shape.n_expert if shape.n_expert else 0.0


def bytes_per_token(shape: ModelShape, weights: WeightBytes, n_past: int, kv_cache: str | None = None) -> float:
    """Bytes one decode step reads: dense weights, one embedding row, the routed experts, and the
    KV cache of `n_past` positions. Divided into a memory bandwidth, this is the decode roofline."""
    row = weights.embedding / max(1, shape.n_vocab)
    return weights.dense + row + routed_expert_bytes(shape, weights) + kv_cache_bytes(shape, n_past, kv_cache)


def estimate(shape: ModelShape, weights: WeightBytes, device: DeviceProfile, *, budget: int | None = None,
             n_ctx: int | None = None, label: str = "", kv_cache: str | None = None) -> FitEstimate:
    """Memory split and decode speed of a model of `shape` and `weights` on `device`, with a KV cache
    of type `kv_cache` (None: f16)."""
    kv_cache = kv_cache_type(kv_cache)
    if n_ctx is not None:
        from edgeai.options import checked_int

        # above the trained context it is capped (next line), as loading would refuse it
        checked_int("n_ctx", n_ctx, minimum=1, why=f"context positions; None: the default of {DEFAULT_N_CTX}")
    n_ctx = min(DEFAULT_N_CTX if n_ctx is None else n_ctx, shape.n_ctx_train)
    budget = device.default_budget if budget is None else budget
    kv = kv_cache_bytes(shape, n_ctx, kv_cache)
    scratch = scratch_bytes(shape, n_ctx)
    fixed = weights.dense + weights.embedding + kv + scratch
    resident_experts = max(0, min(weights.experts, budget - fixed))
    hit = resident_experts / weights.experts if weights.experts else 1.0
    total_per_token = bytes_per_token(shape, weights, n_ctx // 2, kv_cache)
    per_token_storage = routed_expert_bytes(shape, weights) * (1 - hit)
    per_token_memory = total_per_token - per_token_storage
    reached = device.decode_bandwidth  # the profile's peak times the fraction decode was measured to reach
    tps = 0.0  # unknown without bandwidth figures (a detection without the probe)
    if reached > 0 and (device.storage_read > 0 or not per_token_storage):
        tps = 1.0 / (per_token_memory / reached + (per_token_storage / device.storage_read if per_token_storage else 0.0))
    return FitEstimate(device, label, budget, n_ctx, weights, kv, scratch, resident_experts, per_token_memory,
                       per_token_storage, tps, kv_cache)


def gguf_shape_and_weights(path: Path) -> tuple[ModelShape, WeightBytes]:
    """Hyper-parameters and tensor bytes of a GGUF file, from its header."""
    from edgeai.gguf_header import GGUFArray, read_header

    header = read_header(path)
    meta, tensors = header.metadata, header.tensors
    arch = str(meta.get("general.architecture", ""))
    if not arch:
        raise CheckpointError(f"{path} has no general.architecture; it is not a model GGUF")

    from edgeai.architectures import whole_number

    fields = {"embedding_length": "n_embd", "attention.head_count": "n_head", "attention.head_count_kv": "n_head_kv",
              "attention.key_length": "head_dim", "attention.value_length": "head_dim", "vocab_size": "n_vocab",
              "block_count": "n_layer", "feed_forward_length": "n_ff", "expert_feed_forward_length": "n_ff_exp",
              "context_length": "n_ctx_train", "expert_count": "n_expert", "expert_used_count": "n_expert_used"}

    def get(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path} lacks {arch}.{key}; cannot estimate its memory")
        if isinstance(value, GGUFArray):  # per-layer values (some families): the first layer's
            first = header.array(f"{arch}.{key}")[0] if len(value) else default
            value = first.item() if hasattr(first, "item") else first
        return whole_number(str(path), f"{arch}.{key}", value, fields[key])

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    head_k = get("attention.key_length", n_embd // n_head)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    shape = ModelShape(get("block_count"), n_embd, n_head, get("attention.head_count_kv", n_head), head_k,
                       get("attention.value_length", head_k), len(tokens) or get("vocab_size"),
                       get("feed_forward_length", 0) or get("expert_feed_forward_length", 0), get("context_length"),
                       get("expert_count", 0), get("expert_used_count", 0), *_local_layers(meta, str(path)))
    has_output = "output.weight" in tensors
    return shape, _split(((name, t.nbytes) for name, t in tensors.items()), has_output)


def _count_local(hp) -> int:
    from edgeai.architectures import is_local_layer

    return sum(is_local_layer(hp, il) for il in range(hp.n_layer))


def _local_layers(meta, path: str) -> tuple[int, int]:
    """(sliding window, local layers) of a GGUF whose family the architecture table knows; (0, 0)
    for the others (llama.cpp's families: their caches are counted whole)."""
    from edgeai.architectures import UnsupportedArchitectureError, hparams_from_gguf, spec_for_gguf

    try:
        hp = hparams_from_gguf(meta, spec_for_gguf(meta, path), path)
    except UnsupportedArchitectureError:
        return 0, 0
    return hp.sliding_window, _count_local(hp)


def _split(named_bytes, has_output: bool) -> WeightBytes:
    dense = experts = embedding = 0
    for name, n in named_bytes:
        if "_exps.weight" in name:  # stacked experts (their biases stay resident)
            experts += n
        elif name == "token_embd.weight" and has_output:
            embedding += n
        else:  # a tied embedding is also the output matrix: read whole every token
            dense += n
    return WeightBytes(dense, experts, embedding)


def _checkpoint_estimates(folder: Path, device: DeviceProfile, budget: int | None, n_ctx: int | None,
                          kv_cache: str | None) -> list[FitEstimate]:
    from edgeai.converters.plan import open_plan

    out = []
    for recipe in RECIPE_ORDER:
        plan = open_plan(folder, recipe)
        try:
            hp = plan.hparams
            names = {t.name for t in plan.tensors}
            weights = _split(((t.name, t.nbytes) for t in plan.tensors), "output.weight" in names)
        finally:
            plan.close()
        shape = ModelShape(hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.head_dim, hp.n_vocab,
                           hp.n_ff or hp.n_ff_exp, hp.n_ctx_train, hp.n_expert, hp.n_expert_used,
                           hp.sliding_window, _count_local(hp))
        out.append(estimate(shape, weights, device, budget=budget, n_ctx=n_ctx, label=recipe, kv_cache=kv_cache))
    return out


@dataclass(frozen=True)
class FitReport:
    path: Path
    kind: str  # "gguf" | "checkpoint"
    estimates: list[FitEstimate]  # one for an artifact; one per recipe (best first) for a checkpoint

    @property
    def best(self) -> FitEstimate | None:
        """The artifact's estimate if it fits; for a checkpoint the best recipe that fits (resident
        first, then with streamed experts); None when nothing fits."""
        for ok in (lambda e: e.fits, lambda e: e.fits_streaming):
            for e in self.estimates:
                if ok(e):
                    return e
        return None

    def to_json(self) -> dict:
        best = self.best
        return {"path": str(self.path), "kind": self.kind, "best": best.label if best else None,
                "estimates": [e.to_json() for e in self.estimates]}


def fit(model: str | Path | None, device: DeviceProfile | str, *, memory_budget: int | str | None = None,
        n_ctx: int | None = None, kv_cache: str | None = None) -> FitReport:
    """Estimates for `model`, a GGUF artifact or a Hugging Face checkpoint folder (None: the bundled
    SmolLM2), on `device` (a profile, a profile's name from `edgeai devices`, or "this" for this
    machine, detected). memory_budget: bytes or "1.5GiB", "60%" of the device's memory; None: the
    device's default budget. kv_cache: the KV cache's type ("f16" by default, "q8_0", "q4_0",
    "q8_0/q4_0", ...: `runtimes.base.kv_cache_type`)."""
    kv_cache = kv_cache_type(kv_cache)  # refused before any file is read
    from edgeai.budget import parse_budget
    from edgeai.paths import default_model_path

    if isinstance(device, str):
        if device in ("this", "this-machine"):
            from edgeai.devices.detect import detect

            device = detect()
        else:
            from edgeai.devices import get_profile

            device = get_profile(device)
    budget = parse_budget(memory_budget, total_memory=device.memory_bytes)

    path = Path(model) if model is not None else default_model_path()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a .gguf file or a Hugging Face folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; give a .gguf file or a Hugging Face checkpoint folder")
        return FitReport(path, "checkpoint", _checkpoint_estimates(path, device, budget, n_ctx, kv_cache))
    shape, weights = gguf_shape_and_weights(path)
    return FitReport(path, "gguf", [estimate(shape, weights, device, budget=budget, n_ctx=n_ctx, label=path.name,
                                             kv_cache=kv_cache)])


__all__ = ["FitEstimate", "FitReport", "ModelShape", "WeightBytes", "bytes_per_token", "estimate", "fit",
           "gguf_shape_and_weights", "kv_cache_bytes", "scratch_bytes"]
