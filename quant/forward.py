"""The project's numpy reference forward pass, run to collect calibration statistics.

It runs a batch of token sequences through a model one transformer block at a time, reading each
block's weights from a `ConversionPlan` (GGUF names and layouts, float32), and shows the input of
every linear layer to observers:

    tokens -> embed -> for each block: load its weights, run every sequence through it,
                       observe the inputs of its linears, release the weights -> output norm -> logits

Peak memory is one block's weights plus the hidden states [n_tokens_total, n_embd] (and one
sequence's temporaries). The math follows llama.cpp's graphs for the families in
`edgeai.architectures`: q/k rows are in llama.cpp's order, so NORM RoPE rotates adjacent pairs.

Observers receive `LinearInput` events: the rows that multiply one or more weights (q, k and v
share theirs), tagged with the expert for stacked expert tensors. `StatsCollector` reduces them
to per-column statistics (the imatrix statistic mean(x^2), and mean |x|); `RowRecorder` keeps
raw rows of chosen weights. Both are plain observers: anything with an `observe` method is one.

Observers with an `observe_block` method (`BlockObserver`) also see each block's input and output
hidden states and weights after it ran (`BlockOutput`: layer pruning's block influence, expert routing).

`forward` is `embed`, then `load_block` + `run_block` per block, then `head`; callers that change
a block's weights before the next block runs (GPTQ quantizes block i, then computes block i+1's
inputs from the quantized block) call those pieces themselves.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

import numpy as np

from edgeai.architectures import MoESpec, QKNorm, RopeStyle
from edgeai.errors import CalibrationError, TensorError

if TYPE_CHECKING:
    from edgeai.converters.plan import ConversionPlan

log = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "BlockObserver",
    "BlockOutput",
    "BlockWeights",
    "ColumnStats",
    "ExpertIndex",
    "ForwardConfig",
    "LinearInput",
    "Logits",
    "Observer",
    "RopeTables",
    "RowRecorder",
    "StatsCollector",
    "embed",
    "forward",
    "head",
    "load_block",
    "rms_norm",
    "route_tokens",
    "run_block",
]


# ---- observation events --------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertIndex:
    """Which slice of a stacked expert tensor (`ffn_{gate,up,down}_exps`) some rows went through."""

    index: int  # 0 <= index < count
    count: int  # experts in the stacked tensor (n_expert)


@dataclass(frozen=True)
class LinearInput:
    """Rows that multiply one or more weights, as the forward pass computed them.

    `x` is read-only and only valid during the `observe` call: copy it to keep it.
    """

    weights: tuple[str, ...]  # GGUF names of every weight these rows multiply, e.g. ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight")
    x: np.ndarray  # [n_rows, n_in] float32
    expert: ExpertIndex | None = None  # set for stacked expert tensors: only the rows routed to that expert


class Observer(Protocol):
    """Anything that wants to see the inputs of linear layers during `forward`."""

    def observe(self, inp: LinearInput) -> None: ...


@dataclass(frozen=True)
class BlockOutput:
    """One block's input and output hidden states, sent by `forward` to observers that have an
    `observe_block` method (`BlockObserver`). Arrays are read-only and valid only during the call."""

    index: int
    weights: BlockWeights  # the block's tensors, as the pass ran them
    before: np.ndarray  # [n_tokens, n_embd] float32: the block's input (the residual stream)
    after: np.ndarray  # [n_tokens, n_embd] float32: its output
    batch: Batch


class BlockObserver(Observer, Protocol):
    """An observer that also sees whole blocks (layer pruning's block influence, expert routing)."""

    def observe_block(self, out: BlockOutput) -> None: ...


# ---- statistics observers ------------------------------------------------------------------


@dataclass
class ColumnStats:
    """Per-input-column sums over every row one weight multiplied.

    A dense weight has one slot; a stacked expert weight has one slot per expert, which counts only
    the tokens routed to that expert (as llama.cpp's imatrix does for `mul_mat_id`).
    """

    sum_sq: np.ndarray  # [n_slot, n_in] float64: sum of x^2
    sum_abs: np.ndarray  # [n_slot, n_in] float64: sum of |x|
    count: np.ndarray  # [n_slot] int64: rows (tokens) seen
    stacked: bool  # one slot per expert (n_slot = n_expert), else n_slot = 1

    @classmethod
    def empty(cls, n_in: int, n_expert: int | None = None) -> ColumnStats:
        """Zeroed statistics for a weight with `n_in` input columns (`n_expert` slots if stacked)."""
        n_slot = 1 if n_expert is None else n_expert
        return cls(
            sum_sq=np.zeros((n_slot, n_in), np.float64),
            sum_abs=np.zeros((n_slot, n_in), np.float64),
            count=np.zeros(n_slot, np.int64),
            stacked=n_expert is not None,
        )

    def add(self, sum_sq: np.ndarray, sum_abs: np.ndarray, n_rows: int, slot: int = 0) -> None:
        """Add the column sums of `n_rows` rows to `slot` (the expert index, or 0)."""
        self.sum_sq[slot] += sum_sq
        self.sum_abs[slot] += sum_abs
        self.count[slot] += n_rows

    def _mean(self, total: np.ndarray) -> np.ndarray:
        counts = self.count[:, None].astype(np.float64)
        mean = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)  # 0 for unused experts
        return mean if self.stacked else mean[0]

    def mean_sq(self) -> np.ndarray:
        """The imatrix statistic, mean of x^2 per input column: [n_in], or [n_expert, n_in] when stacked."""
        return self._mean(self.sum_sq)

    def mean_abs(self) -> np.ndarray:
        """Mean |x| per input column (AWQ's activation scale): [n_in], or [n_expert, n_in] when stacked."""
        return self._mean(self.sum_abs)

    def tokens(self) -> int | np.ndarray:
        """Rows seen: an int, or [n_expert] int64 when stacked."""
        return self.count.copy() if self.stacked else int(self.count[0])


class StatsCollector:
    """Observer that accumulates `ColumnStats` for every weight, keyed by GGUF weight name."""

    def __init__(self) -> None:
        self.columns: dict[str, ColumnStats] = {}

    def observe(self, inp: LinearInput) -> None:
        n_rows, n_in = inp.x.shape
        sum_sq = np.square(inp.x).sum(axis=0, dtype=np.float64)  # [n_in]
        sum_abs = np.abs(inp.x).sum(axis=0, dtype=np.float64)  # [n_in]
        n_expert = inp.expert.count if inp.expert else None
        for name in inp.weights:
            stats = self.columns.get(name)
            if stats is None:
                stats = self.columns[name] = ColumnStats.empty(n_in, n_expert)
            stats.add(sum_sq, sum_abs, n_rows, inp.expert.index if inp.expert else 0)


class RowRecorder:
    """Observer that keeps copies of the input rows of chosen weights (GPTQ builds X^T X from them).

    Rows of a stacked expert weight are kept per expert. `max_rows` caps the rows kept per
    (weight, expert); the first ones are kept.
    """

    def __init__(self, weights: Iterable[str], max_rows: int | None = None) -> None:
        self.wanted = frozenset(weights)
        self.max_rows = max_rows
        self._rows: dict[tuple[str, int | None], list[np.ndarray]] = {}
        self._kept: dict[tuple[str, int | None], int] = {}

    def observe(self, inp: LinearInput) -> None:
        expert = inp.expert.index if inp.expert else None
        for name in self.wanted.intersection(inp.weights):
            key = (name, expert)
            kept = self._kept.get(key, 0)
            room = inp.x.shape[0] if self.max_rows is None else max(0, self.max_rows - kept)
            if room == 0:
                continue
            self._rows.setdefault(key, []).append(np.array(inp.x[:room]))
            self._kept[key] = kept + min(room, inp.x.shape[0])

    def rows(self, weight: str, expert: int | None = None) -> np.ndarray:
        """The recorded input rows of `weight` (of one expert, for stacked experts): [n_rows, n_in]."""
        if weight not in self.wanted:
            raise KeyError(f"{weight} was not among the weights this recorder was asked to keep")
        parts = self._rows.get((weight, expert))
        if not parts:
            raise KeyError(f"no rows were seen for {weight}" + (f" expert {expert}" if expert is not None else ""))
        return np.concatenate(parts)


# ---- model description ---------------------------------------------------------------------


class Logits(enum.Enum):
    """Which logits `forward` returns."""

    NONE = "none"  # none: calibration only needs the observers
    LAST = "last"  # [n_seq, n_vocab]: each sequence's last position
    ALL = "all"  # [n_tokens_total, n_vocab]: every position, sequences concatenated


@dataclass(frozen=True)
class ForwardConfig:
    """What the forward pass needs to know about a model: its spec, hyper-parameters and which
    optional tensors the plan has."""

    n_layer: int
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope: RopeStyle
    rope_theta: float
    position_scale: float  # linear RoPE scaling multiplies positions by 1/factor; else 1
    has_rope_freqs: bool  # Llama 3.1 scaling: `rope_freqs.weight` divides each frequency
    qk_norm: QKNorm
    moe: MoESpec | None
    n_expert: int
    n_expert_used: int
    output_weight: str  # "output.weight", or "token_embd.weight" when the embedding is tied

    @classmethod
    def from_plan(cls, plan: ConversionPlan) -> ForwardConfig:
        """The config of a planned conversion; CalibrationError if its architecture has no spec."""
        spec, hp = plan.spec, plan.hparams
        if spec is None or hp is None:
            raise CalibrationError(
                f"{plan.source_files[0]}: architecture {plan.arch!r} has no spec in edgeai.converters, so "
                "edgeai cannot run it to calibrate; convert it without calibration"
            )
        if spec.sandwich_norms or spec.swa_pattern_default is not None:
            raise CalibrationError(
                f"{plan.source_files[0]}: calibration's forward pass has no {spec.family} layers (sliding windows, "
                "norms after attention and FFN) yet; convert it without calibration (no --method awq/gptq, no imatrix)"
            )
        assert hp.n_head % hp.n_head_kv == 0, "ArchSpec.hparams refuses other head counts"
        names = {t.name for t in plan.tensors}
        scaling = hp.rope_scaling or {}
        linear = scaling.get("rope_type") == "linear"
        return cls(
            n_layer=hp.n_layer,
            n_vocab=_shape(plan, "token_embd.weight")[0],
            n_embd=hp.n_embd,
            n_head=hp.n_head,
            n_head_kv=hp.n_head_kv,
            head_dim=hp.head_dim,
            rms_eps=hp.rms_eps,
            rope=spec.rope,
            rope_theta=hp.rope_theta,
            position_scale=1.0 / float(scaling["factor"]) if linear else 1.0,
            has_rope_freqs="rope_freqs.weight" in names,
            qk_norm=spec.qk_norm,
            moe=spec.moe,
            n_expert=hp.n_expert,
            n_expert_used=hp.n_expert_used,
            output_weight="output.weight" if "output.weight" in names else "token_embd.weight",
        )


@dataclass(frozen=True)
class Batch:
    """Token sequences, concatenated: sequence s is rows offsets[s]:offsets[s+1] of every
    token-major array (hidden states, RoPE tables, ALL logits)."""

    tokens: np.ndarray  # [n_tokens] int64
    offsets: np.ndarray  # [n_seq + 1] int64
    positions: np.ndarray  # [n_tokens] int64, from 0 in each sequence

    @classmethod
    def of(cls, sequences: Sequence[Sequence[int] | np.ndarray], n_vocab: int) -> Batch:
        """A batch of integer token sequences; CalibrationError on an empty sequence or a bad id."""
        arrays = [np.asarray(s) for s in sequences]
        if not arrays:
            raise CalibrationError("no token sequences were given")
        for i, a in enumerate(arrays):
            if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
                raise CalibrationError(f"token sequence {i} must be a non-empty 1-D integer array, got {a.dtype} {a.shape}")
            if a.min() < 0 or a.max() >= n_vocab:
                raise CalibrationError(f"token sequence {i} has ids outside the vocabulary [0, {n_vocab})")
        lengths = np.array([a.size for a in arrays], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        positions = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        return cls(np.concatenate(arrays).astype(np.int64), offsets, positions)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def spans(self) -> list[slice]:
        """Each sequence's rows."""
        return [slice(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:])]


@dataclass(frozen=True)
class RopeTables:
    """cos/sin of every token's rotation angles, shared by all blocks."""

    style: RopeStyle
    cos: np.ndarray  # [n_tokens, head_dim/2] float32
    sin: np.ndarray  # [n_tokens, head_dim/2] float32

    @classmethod
    def build(cls, cfg: ForwardConfig, positions: np.ndarray, rope_freqs: np.ndarray | None) -> RopeTables:
        """Angles pos * theta^(-2i/d), with positions scaled (linear) and frequencies divided by
        `rope_freqs` [head_dim/2] (Llama 3.1), as llama.cpp computes them."""
        d = cfg.head_dim
        inv_freq = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
        if rope_freqs is not None:
            inv_freq = inv_freq / rope_freqs.astype(np.float64)
        angles = (positions.astype(np.float64) * cfg.position_scale)[:, None] * inv_freq  # [n_tokens, d/2]
        return cls(cfg.rope, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32))

    def apply(self, x: np.ndarray, rows: slice) -> np.ndarray:
        """Rotate x [T, n_heads, head_dim] of the tokens at `rows`."""
        cos, sin = self.cos[rows, None, :], self.sin[rows, None, :]  # [T, 1, d/2]
        if self.style is RopeStyle.NEOX:  # pairs (x_i, x_{i+d/2})
            half = x.shape[-1] // 2
            a, b = x[..., :half], x[..., half:]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
        a, b = x[..., 0::2], x[..., 1::2]  # NORM: adjacent pairs (x_2i, x_2i+1)
        return np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)


@dataclass
class BlockWeights:
    """One transformer block's tensors (float32, GGUF layout), keyed by name relative to
    `blk.{index}.`, e.g. `attn_q.weight`."""

    index: int
    tensors: dict[str, np.ndarray]

    def name(self, role: str) -> str:
        return f"blk.{self.index}.{role}"

    def __getitem__(self, role: str) -> np.ndarray:
        try:
            return self.tensors[role]
        except KeyError:
            raise TensorError(f"tensor {self.name(role)!r} is missing; this architecture's forward pass needs it") from None

    def get(self, role: str) -> np.ndarray | None:
        return self.tensors.get(role)


# ---- the pass ------------------------------------------------------------------------------


def _missing(plan: ConversionPlan, name: str) -> TensorError:
    return TensorError(f"{plan.source_files[0]}: tensor {name!r} is missing; the forward pass needs it")


def _read(plan: ConversionPlan, name: str) -> np.ndarray:
    try:
        return plan.read(name)
    except KeyError:
        raise _missing(plan, name) from None


def _shape(plan: ConversionPlan, name: str) -> tuple[int, ...]:
    try:
        return plan.tensor(name).shape
    except KeyError:
        raise _missing(plan, name) from None


def load_block(plan: ConversionPlan, index: int) -> BlockWeights:
    """Read block `index`'s tensors (and only those) from the plan."""
    prefix = f"blk.{index}."
    names = [t.name for t in plan.tensors if t.name.startswith(prefix)]
    return BlockWeights(index, {n.removeprefix(prefix): _read(plan, n) for n in names})


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps) * weight


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _silu(x: np.ndarray) -> np.ndarray:
    return x * _sigmoid(x)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class _Emitter:
    """Sends `LinearInput`s of one block to the observers (nothing is built when there are none)."""

    def __init__(self, observers: Sequence[Observer], block: BlockWeights | None = None):
        self.observers = observers
        self.block = block  # names roles "blk.{i}.<role>"; None: roles are full names

    def __call__(self, roles: tuple[str, ...], x: np.ndarray, expert: ExpertIndex | None = None) -> None:
        if not self.observers:
            return
        weights = tuple(self.block.name(r) for r in roles) if self.block else roles
        event = LinearInput(weights, _read_only(x), expert)
        for obs in self.observers:
            obs.observe(event)


def _linear(w: BlockWeights, role: str, x: np.ndarray) -> np.ndarray:
    """x [T, n_in] @ weight[out, in].T (+ bias), for `role` such as "attn_q"."""
    y = x @ w[f"{role}.weight"].T
    bias = w.get(f"{role}.bias")
    return y if bias is None else y + bias


def _attention(cfg: ForwardConfig, w: BlockWeights, x: np.ndarray, rope: RopeTables, rows: slice, emit: _Emitter) -> np.ndarray:
    """Causal self-attention of one sequence x [T, n_embd] -> [T, n_embd] (the residual is the caller's)."""
    n_tok, d = x.shape[0], cfg.head_dim
    h = rms_norm(x, w["attn_norm.weight"], cfg.rms_eps)  # [T, n_embd]
    emit(("attn_q.weight", "attn_k.weight", "attn_v.weight"), h)
    q = _linear(w, "attn_q", h)  # [T, n_head * d]
    k = _linear(w, "attn_k", h)  # [T, n_head_kv * d]
    v = _linear(w, "attn_v", h)  # [T, n_head_kv * d]
    if cfg.qk_norm is QKNorm.FULL:  # over the whole projection, before heads are split
        q = rms_norm(q, w["attn_q_norm.weight"], cfg.rms_eps)
        k = rms_norm(k, w["attn_k_norm.weight"], cfg.rms_eps)
    q = q.reshape(n_tok, cfg.n_head, d)  # [T, n_head, d]
    k = k.reshape(n_tok, cfg.n_head_kv, d)  # [T, n_head_kv, d]
    v = v.reshape(n_tok, cfg.n_head_kv, d)  # [T, n_head_kv, d]
    if cfg.qk_norm is QKNorm.PER_HEAD:
        q = rms_norm(q, w["attn_q_norm.weight"], cfg.rms_eps)
        k = rms_norm(k, w["attn_k_norm.weight"], cfg.rms_eps)
    q, k = rope.apply(q, rows), rope.apply(k, rows)

    group = cfg.n_head // cfg.n_head_kv  # query heads per kv head: head h uses kv head h // group
    q = q.reshape(n_tok, cfg.n_head_kv, group, d)  # [T, n_head_kv, group, d]
    mask = np.triu(np.full((n_tok, n_tok), -np.inf, np.float32), k=1)  # [T, T]: no attending ahead
    scale = np.float32(1.0 / np.sqrt(d))
    out = np.empty((n_tok, cfg.n_head_kv, group, d), np.float32)  # [T, n_head_kv, group, d]
    for kv in range(cfg.n_head_kv):  # one kv head at a time bounds the scores to [group, T, T]
        qh = q[:, kv].transpose(1, 0, 2)  # [group, T, d]
        scores = qh @ k[:, kv].T * scale + mask  # [group, T, T]
        out[:, kv] = (_softmax(scores) @ v[:, kv]).transpose(1, 0, 2)  # [T, group, d]
    attn = out.reshape(n_tok, cfg.n_head * d)  # [T, n_head * d], heads in order
    emit(("attn_output.weight",), attn)
    return _linear(w, "attn_output", attn)


def _dense_ffn(w: BlockWeights, h: np.ndarray, emit: _Emitter) -> np.ndarray:
    """SwiGLU feed-forward: h [T, n_embd] -> [T, n_embd]."""
    emit(("ffn_gate.weight", "ffn_up.weight"), h)
    a = _silu(_linear(w, "ffn_gate", h)) * _linear(w, "ffn_up", h)  # [T, n_ff]
    emit(("ffn_down.weight",), a)
    return _linear(w, "ffn_down", a)


def route_tokens(cfg: ForwardConfig, router: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which experts each token runs and with what weight, as llama.cpp routes them.

    router [n_expert, n_embd], h [T, n_embd] -> (chosen [T, top_k] expert ids in any order,
    route [T, top_k] their weights: softmax over all experts, renormalized over the top k where
    the family does so).
    """
    assert cfg.moe is not None
    top_k = cfg.n_expert_used
    probs = _softmax(h @ router.T)  # [T, n_expert], over all experts
    chosen = np.argpartition(-probs, top_k - 1, axis=1)[:, :top_k]  # [T, top_k]
    route = np.take_along_axis(probs, chosen, axis=1)  # [T, top_k]
    if cfg.moe.renormalizes_top_k:
        route = route / route.sum(axis=1, keepdims=True)
    return chosen, route


def _moe_ffn(cfg: ForwardConfig, w: BlockWeights, h: np.ndarray, emit: _Emitter) -> np.ndarray:
    """Routed experts (plus the gated shared expert): h [T, n_embd] -> [T, n_embd]."""
    moe = cfg.moe
    assert moe is not None
    shared_roles = ("ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight") if moe.shared_expert else ()
    emit(("ffn_gate_inp.weight", *shared_roles), h)

    chosen, route = route_tokens(cfg, w["ffn_gate_inp.weight"], h)  # [T, top_k] each

    gate = w["ffn_gate_exps.weight"]  # [n_expert, n_ff_exp, n_embd]
    up = w["ffn_up_exps.weight"]  # [n_expert, n_ff_exp, n_embd]
    down = w["ffn_down_exps.weight"]  # [n_expert, n_embd, n_ff_exp]
    out = np.zeros_like(h)  # [T, n_embd]
    for e in range(cfg.n_expert):
        rows, slot = np.nonzero(chosen == e)  # tokens routed to e (each at most once), in order
        if rows.size == 0:
            continue
        expert = ExpertIndex(e, cfg.n_expert)
        xe = h[rows]  # [n_rows, n_embd]
        emit(("ffn_gate_exps.weight", "ffn_up_exps.weight"), xe, expert)
        a = _silu(xe @ gate[e].T) * (xe @ up[e].T)  # [n_rows, n_ff_exp]
        emit(("ffn_down_exps.weight",), a, expert)
        out[rows] += route[rows, slot][:, None] * (a @ down[e].T)

    if moe.shared_expert:
        a = _silu(_linear(w, "ffn_gate_shexp", h)) * _linear(w, "ffn_up_shexp", h)  # [T, n_ff_shexp]
        emit(("ffn_down_shexp.weight",), a)
        gate_shared = _sigmoid(h @ w["ffn_gate_inp_shexp.weight"])  # [T]
        out += gate_shared[:, None] * _linear(w, "ffn_down_shexp", a)
    return out


def run_block(
    cfg: ForwardConfig,
    weights: BlockWeights,
    hidden: np.ndarray,
    batch: Batch,
    rope: RopeTables,
    observers: Sequence[Observer] = (),
) -> None:
    """Run every sequence's rows of `hidden` [n_tokens, n_embd] through one block, in place."""
    emit = _Emitter(observers, weights)
    for rows in batch.spans():
        x = hidden[rows]  # [T, n_embd]
        x = x + _attention(cfg, weights, x, rope, rows, emit)
        h = rms_norm(x, weights["ffn_norm.weight"], cfg.rms_eps)  # [T, n_embd]
        ffn = _dense_ffn(weights, h, emit) if cfg.moe is None else _moe_ffn(cfg, weights, h, emit)
        hidden[rows] = x + ffn


def _read_only(x: np.ndarray) -> np.ndarray:
    view = x.view()
    view.flags.writeable = False
    return view


def embed(plan: ConversionPlan, batch: Batch) -> np.ndarray:
    """The token embeddings of the batch: [n_tokens, n_embd] float32 (the table is released after)."""
    table = _read(plan, "token_embd.weight")  # [n_vocab, n_embd]
    return np.ascontiguousarray(table[batch.tokens], dtype=np.float32)


def head(
    plan: ConversionPlan,
    cfg: ForwardConfig,
    hidden: np.ndarray,
    batch: Batch,
    logits: Logits = Logits.LAST,
    observers: Sequence[Observer] = (),
) -> np.ndarray | None:
    """Output norm, then the output projection for the positions `logits` asks for.

    Observers see the normed rows of every position as the input of `cfg.output_weight`
    (`token_embd.weight` when the embedding is tied), whatever `logits` is.
    """
    if logits is Logits.NONE and not observers:
        return None
    norm = _read(plan, "output_norm.weight")  # [n_embd]
    out_w = None if logits is Logits.NONE else _read(plan, cfg.output_weight)  # [n_vocab, n_embd]
    emit = _Emitter(observers)
    parts = []
    for rows in batch.spans():
        h = rms_norm(hidden[rows], norm, cfg.rms_eps)  # [T, n_embd]
        emit((cfg.output_weight,), h)
        if logits is Logits.ALL:
            parts.append(h @ out_w.T)  # [T, n_vocab]
        elif logits is Logits.LAST:
            parts.append(h[-1:] @ out_w.T)  # [1, n_vocab]
    return np.concatenate(parts) if parts else None


def forward(
    plan: ConversionPlan,
    sequences: Sequence[Sequence[int] | np.ndarray],
    *,
    observers: Sequence[Observer] = (),
    logits: Logits = Logits.LAST,
) -> np.ndarray | None:
    """Run token sequences through the model, one block's weights in memory at a time.

    Args:
        plan: a planned conversion (`edgeai.converters.plan.open_plan`); weights are read
            from it block by block, as float32 in GGUF layout.
        sequences: integer token arrays, each attended causally from position 0.
        observers: each sees the input rows of every linear layer (`LinearInput`).
        logits: which logits to return (`Logits.LAST`: [n_seq, n_vocab]; `Logits.ALL`:
            [n_tokens_total, n_vocab]; `Logits.NONE`: None).

    Returns:
        The logits asked for, float32, or None.
    """
    cfg = ForwardConfig.from_plan(plan)
    batch = Batch.of(sequences, cfg.n_vocab)
    started = time.perf_counter()
    rope_freqs = _read(plan, "rope_freqs.weight") if cfg.has_rope_freqs else None
    rope = RopeTables.build(cfg, batch.positions, rope_freqs)
    hidden = embed(plan, batch)  # [n_tokens, n_embd]
    log.info("forward: %d sequence(s), %d tokens, %d blocks", len(batch.spans()), batch.n_tokens, cfg.n_layer)
    block_observers = [obs for obs in observers if hasattr(obs, "observe_block")]
    for index in range(cfg.n_layer):
        weights = load_block(plan, index)
        before = hidden.copy() if block_observers else None  # [n_tokens, n_embd]
        run_block(cfg, weights, hidden, batch, rope, observers)
        if block_observers:
            event = BlockOutput(index, weights, _read_only(before), _read_only(hidden), batch)
            for obs in block_observers:
                obs.observe_block(event)
        del weights, before  # released before the next block is read
        log.debug("forward: block %d/%d done", index + 1, cfg.n_layer)
    result = head(plan, cfg, hidden, batch, logits, observers)
    log.info("forward: done in %.1f s", time.perf_counter() - started)
    return result
