"""AWQ: activation-aware per-input-channel scaling, folded into the layer before, so the file stays
plain GGUF (Lin et al., 2023).

A linear layer y = x W^T is unchanged when its input columns are divided by s and its weight
columns multiplied by s: y = (x / s)(W diag(s))^T. Scaling up the columns whose inputs are large
gives them finer steps on the quantization grid, at the cost of coarser ones for quiet columns.
The division by s is folded exactly into whatever produced x:

    attn_norm.weight / s   ->  attn_q, attn_k, attn_v columns * s
    attn_v rows (+bias) / s ->  attn_output columns * s   (s tied across the query heads of a kv head)
    ffn_norm.weight / s    ->  ffn_gate, ffn_up columns * s
    ffn_up rows (+bias) / s ->  ffn_down columns * s      (silu(gate) * up is linear in up)

so the float model computes the same function and llama.cpp runs the result unchanged.

Per group and layer, s = mean|x|^alpha (normalised to a geometric mean of 1 between its extremes),
with alpha searched on a grid (scored on a sample of each weight's rows, the winner checked on
all of them) for the least layer-output error on the calibration inputs:
sum over the group's weights of tr(D H D^T), D = Q(W diag(s)) / s - W, H = X^T X. The quantizer
inside the search is the one the writer uses afterwards (importance-weighted scale search, with
the imatrix of the scaled inputs), and alpha = 0 (s = 1) is on the grid, so AWQ is never worse than
the plain imatrix method on the calibration error it measures.

Routed experts of MoE blocks are not scaled (their input also feeds the router); their attention is.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from edgeai.quant.formats import Fit, QuantFormat, decode, quantize
from edgeai.quant.forward import (
    Batch,
    ForwardConfig,
    LinearInput,
    Logits,
    RopeTables,
    StatsCollector,
    embed,
    head,
    load_block,
    run_block,
)

if TYPE_CHECKING:
    from edgeai.converters.plan import ConversionPlan, OutputTensor

log = logging.getLogger(__name__)

__all__ = ["AwqResult", "GROUPS", "ScaleGroup", "awq_model", "search_scale"]

DEFAULT_GRID = 10  # alphas 0, 1/10, ..., 9/10 (the AWQ paper tries 20)
SEARCH_ROWS = 192  # output rows per weight the grid is scored on (evenly spaced); the choice is checked on all


class Producer(enum.Enum):
    """What the division by s is folded into."""

    NORM = "norm"  # an RMSNorm weight [n_in]
    ROWS = "rows"  # the output rows (and bias) of the projection before


@dataclass(frozen=True)
class ScaleGroup:
    """Weights sharing one input, and the tensor that produced that input (roles within a block)."""

    producer: str
    kind: Producer
    consumers: tuple[str, ...]


GROUPS: tuple[ScaleGroup, ...] = (
    ScaleGroup("attn_norm.weight", Producer.NORM, ("attn_q.weight", "attn_k.weight", "attn_v.weight")),
    ScaleGroup("attn_v.weight", Producer.ROWS, ("attn_output.weight",)),
    ScaleGroup("ffn_norm.weight", Producer.NORM, ("ffn_gate.weight", "ffn_up.weight")),
    ScaleGroup("ffn_up.weight", Producer.ROWS, ("ffn_down.weight",)),
)


@dataclass
class _InputStats:
    """X^T X and sum |x| of one input, over every calibration row."""

    hessian: np.ndarray  # [n_in, n_in] float64
    sum_abs: np.ndarray  # [n_in] float64
    rows: int = 0


@dataclass
class _GroupInputs:
    """Observer: input statistics of the first consumer of each scale group of one block."""

    wanted: set[str]
    stats: dict[str, _InputStats] = field(default_factory=dict)

    def observe(self, inp: LinearInput) -> None:
        if inp.expert is not None:
            return
        for name in self.wanted.intersection(inp.weights):
            x = inp.x  # [n_rows, n_in] float32
            s = self.stats.get(name)
            if s is None:
                n_in = x.shape[1]
                s = self.stats[name] = _InputStats(np.zeros((n_in, n_in)), np.zeros(n_in))
            s.hessian += x.T @ x  # float32 product, float64 sum
            s.sum_abs += np.abs(x).sum(axis=0, dtype=np.float64)
            s.rows += x.shape[0]


def _scales(act: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's s = act^alpha, clamped, divided by sqrt(max * min) so large and small balance around 1."""
    s = np.maximum(act, 1e-8) ** alpha
    s = np.maximum(s, 1e-4)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def search_scale(weights: Sequence[np.ndarray], formats: Sequence[QuantFormat | None], hessian: np.ndarray,
                 act: np.ndarray, *, tie: np.ndarray | None = None, grid: int = DEFAULT_GRID,
                 rows: int = SEARCH_ROWS, n_threads: int = 0) -> tuple[np.ndarray, float, float, float]:
    """The AWQ scale of one group of weights that share an input.

    Args:
        weights: each [n_out_i, n_in] float32 (GGUF layout: rows are outputs).
        formats: the type each weight is written in; None (or a non-block type) counts as exact.
        hessian: X^T X of the shared input over the calibration rows, [n_in, n_in].
        act: mean |x| per scaled channel: [n_in], or [n_channel] when `tie` maps columns to channels.
        tie: [n_in] channel index of each input column (several columns share one scale), or None.
        grid: alphas 0, 1/grid, ..., (grid-1)/grid are tried, each scored on `rows` evenly spaced
            output rows of every weight; the best is then scored on all rows against alpha 0 (s = 1),
            and kept only if it is better there too.

    Returns:
        (s per channel [n_channel] float32, the alpha chosen, its error, the error at alpha 0), where
        error = sum_i tr(D_i H D_i^T) with D_i = Q(W_i diag(s)) / s - W_i, in the original coordinates.
    """
    h = hessian.astype(np.float32)
    diag = np.maximum(np.diag(hessian), 0.0)
    quantized = [(w, fmt) for w, fmt in zip(weights, formats) if fmt is not None and fmt.block_size > 1]
    sampled = [(w[np.linspace(0, w.shape[0] - 1, min(rows, w.shape[0])).astype(np.int64)], fmt) for w, fmt in quantized]

    def group_error(s_channel: np.ndarray, pairs) -> float:
        s = s_channel if tie is None else s_channel[tie]  # [n_in]
        importance = (diag / np.square(s.astype(np.float64))).astype(np.float32)
        error = 0.0
        for w, fmt in pairs:
            raw = quantize(w * s, fmt, fit=Fit.SEARCH, importance=importance, n_threads=n_threads)
            d = decode(raw, fmt, n_threads=n_threads).reshape(w.shape) / s - w  # [n_out, n_in]
            error += float(np.einsum("ij,ij->", d @ h, d, dtype=np.float64))
        return error

    scored = [(group_error(_scales(act, step / grid), sampled), step / grid) for step in range(grid)]
    alpha = min(scored)[1]
    base_error = group_error(_scales(act, 0.0), quantized)
    if alpha == 0.0:
        return _scales(act, 0.0), 0.0, base_error, base_error
    error = group_error(_scales(act, alpha), quantized)
    if error >= base_error:  # the sampled rows misled the choice: keep s = 1
        return _scales(act, 0.0), 0.0, base_error, base_error
    return _scales(act, alpha), alpha, error, base_error


@dataclass
class AwqResult:
    """What AWQ changed: per-tensor column multipliers and row divisors (applied when the tensor is
    read), the importance of every linear weight's (scaled) input, and the alpha of each group."""

    col_scale: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [n_in]: columns * s
    row_divisor: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [n_out] (or [n] for norms): / s
    importance: dict[str, np.ndarray] = field(default_factory=dict)  # name -> mean x^2 of its input, [n_in]
    alphas: dict[str, float] = field(default_factory=dict)  # "blk.i.<producer>" -> alpha
    gain: float = 0.0  # summed calibration error at alpha 0 / with AWQ's alphas
    grid: int = DEFAULT_GRID

    def recipe(self) -> dict[str, object]:
        """What an artifact's recipe records about the scaling."""
        return {"grid": self.grid, "alphas": {k: round(v, 3) for k, v in self.alphas.items()},
                "error_ratio": round(1.0 / self.gain, 4) if self.gain else None}

    def apply(self, plan: ConversionPlan) -> None:
        """Make the plan's readers return the scaled tensors (the float model computes the same function)."""
        for t in plan.tensors:
            col, row = self.col_scale.get(t.name), self.row_divisor.get(t.name)
            if col is not None or row is not None:
                t.chunks = _scaled_chunks(t, col, row)


def _scaled_chunks(t: OutputTensor, col: np.ndarray | None, row: np.ndarray | None) -> Callable[[], Iterator[np.ndarray]]:
    original = t.chunks

    def chunks() -> Iterator[np.ndarray]:
        parts = list(original())
        data = np.concatenate([p.reshape(-1) for p in parts]).reshape(t.shape) if len(parts) > 1 else parts[0].reshape(t.shape)
        data = data.astype(np.float32, copy=True)
        if col is not None:
            data *= col  # [n_out, n_in] * [n_in]
        if row is not None:
            data /= row if data.ndim == 1 else row[:, None]
        yield data

    return chunks


def _tie_index(cfg: ForwardConfig) -> np.ndarray:
    """attn_output's input column (head h, dim i) -> the attn_v row (kv head h // group, dim i) it came from."""
    group = cfg.n_head // cfg.n_head_kv
    heads = np.arange(cfg.n_head) // group  # [n_head]
    return (heads[:, None] * cfg.head_dim + np.arange(cfg.head_dim)).reshape(-1)  # [n_head * head_dim]


def awq_model(plan: ConversionPlan, sequences: Sequence[np.ndarray], *, grid: int = DEFAULT_GRID, n_threads: int = 0,
              progress: Callable[[str], None] | None = None) -> AwqResult:
    """Search AWQ scales for every block of `plan` on the calibration `sequences`.

    The model runs block by block in float (scaling does not change its function); each block's
    group inputs are collected, scales searched against the types the plan writes, and the block's
    output feeds the next. Returns the scales (not yet applied: `AwqResult.apply`) and the
    importance of every linear weight's input after scaling.
    """
    cfg = ForwardConfig.from_plan(plan)
    batch = Batch.of(sequences, cfg.n_vocab)
    rope_freqs = plan.read("rope_freqs.weight") if cfg.has_rope_freqs else None
    rope = RopeTables.build(cfg, batch.positions, rope_freqs)
    result = AwqResult(grid=grid)
    tie = _tie_index(cfg)
    total_base, total = 0.0, 0.0
    hidden = embed(plan, batch)  # [n_tokens, n_embd]
    for index in range(cfg.n_layer):
        weights = load_block(plan, index)
        groups = [g for g in GROUPS if g.producer in weights.tensors and all(c in weights.tensors for c in g.consumers)]
        inputs = _GroupInputs({weights.name(g.consumers[0]) for g in groups})
        stats = StatsCollector()
        run_block(cfg, weights, hidden, batch, rope, [inputs, stats])
        for name, column in stats.columns.items():
            result.importance[name] = column.mean_sq().astype(np.float32)
        for g in groups:
            names = [weights.name(c) for c in g.consumers]
            formats = [plan.tensor(n).fmt for n in names]
            if all(f.block_size == 1 for f in formats):
                continue  # nothing in this group is quantized
            inp = inputs.stats.get(names[0])
            if inp is None or inp.rows == 0:
                continue
            act = inp.sum_abs / inp.rows  # [n_in]
            group_tie = None
            if g.kind is Producer.ROWS and g.producer == "attn_v.weight" and cfg.n_head != cfg.n_head_kv:
                group_tie = tie
                counts = np.bincount(tie, minlength=weights[g.producer].shape[0])
                act = np.bincount(tie, weights=act, minlength=counts.size) / counts  # mean over the heads sharing it
            s, alpha, error, base = search_scale([weights[c] for c in g.consumers], formats, inp.hessian, act,
                                                 tie=group_tie, grid=grid, n_threads=n_threads)
            total_base, total = total_base + base, total + error
            producer = weights.name(g.producer)
            result.alphas[producer] = alpha
            if alpha == 0.0:
                continue  # s = 1: nothing to fold
            s_cols = s if group_tie is None else s[group_tie]
            for n in names:
                result.col_scale[n] = s_cols
                result.importance[n] = (result.importance[n] / np.square(s_cols)).astype(np.float32)
            result.row_divisor[producer] = s
            bias = producer.removesuffix(".weight") + ".bias"
            if g.kind is Producer.ROWS and bias.removeprefix(f"blk.{index}.") in weights.tensors:
                result.row_divisor[bias] = s
        if progress:
            progress(f"block {index + 1}/{cfg.n_layer}")
        del weights
    stats = StatsCollector()
    head(plan, cfg, hidden, batch, Logits.NONE, [stats])
    for name, column in stats.columns.items():
        result.importance[name] = column.mean_sq().astype(np.float32)
    result.gain = total_base / total if total > 0 else 1.0
    log.info("AWQ: calibration layer-output error %.4g -> %.4g (x%.3f)", total_base, total, 1 / result.gain if result.gain else 1)
    return result
