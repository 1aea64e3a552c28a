"""GPTQ: quantize a weight column by column, feeding each column's rounding error forward into the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al.,
2022). The result is an ordinary block type (Q4_K, Q4_0, ...) that llama.cpp runs unchanged.

Block formats fix their scales per (super-)block: when the pass reaches a block's first column, the
block's scales are chosen from the *updated* weights (importance-weighted search in the C++ core),
then frozen; each column's codes are the nearest points of that frozen grid.

The model is processed block by block (`gptq_model`): the inputs that build each layer's Hessian
come from the already-quantized blocks before it, so later layers correct for earlier errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from edgeai.quant.blocks import block_grid, pack_codes
from edgeai.quant.formats import Fit, QuantFormat, decode, quantize
from edgeai.quant.forward import (
    Batch,
    ForwardConfig,
    LinearInput,
    Logits,
    RopeTables,
    embed,
    head,
    load_block,
    run_block,
)

if TYPE_CHECKING:
    from edgeai.converters.plan import ConversionPlan

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (GPTQ's "percdamp")


def _inverse_cholesky(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of H^-1 ([n_in, n_in] float64), damping more until H is positive definite."""
    n = hessian.shape[0]
    mean_diag = float(np.mean(np.diag(hessian))) or 1.0
    for attempt in range(8):
        h = hessian + np.eye(n) * damp * mean_diag * (10.0 ** attempt)
        try:
            np.linalg.cholesky(h)  # raises unless positive definite
            h_inv = np.linalg.inv(h)
            return np.linalg.cholesky((h_inv + h_inv.T) / 2).T  # upper: H^-1 = U^T U
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the Hessian stays singular after damping")


def gptq_encode(w: np.ndarray, hessian: np.ndarray, fmt: QuantFormat, *, damp: float = DEFAULT_DAMP,
                n_threads: int = 0) -> np.ndarray:
    """Encode weight `w` [n_out, n_in] in `fmt` with GPTQ error feedback.

    hessian: X^T X of the layer's inputs, [n_in, n_in] (any positive scale).
    Returns the raw bytes, [n_out * n_in / block_size * type_size] uint8 (row-major, as GGUF stores them).
    """
    n_out, n_in = w.shape
    bs = fmt.block_size
    assert n_in % bs == 0
    w = w.astype(np.float64, copy=True)
    h = hessian.astype(np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # columns no input ever reached: nothing to preserve there
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp)  # [n_in, n_in], upper
    importance = np.diag(h).astype(np.float32)
    n_blocks = n_in // bs
    raw = np.empty((n_out, n_blocks, fmt.type_size), np.uint8)
    for b in range(n_blocks):
        c0, c1 = b * bs, (b + 1) * bs
        # freeze this block's grid from the weights as updated so far
        block_raw = quantize(w[:, c0:c1].astype(np.float32), fmt, fit=Fit.SEARCH, importance=importance[c0:c1],
                             n_threads=n_threads).reshape(n_out, fmt.type_size)
        scale, offset, levels, sub = block_grid(fmt.name, block_raw)  # [n_out, n_sub]
        codes = np.empty((n_out, bs), np.int32)
        errors = np.empty((n_out, bs))
        for j in range(c0, c1):
            s = (j - c0) // sub
            sc, off = scale[:, s].astype(np.float64), offset[:, s].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                k = np.where(sc != 0, np.clip(np.rint((w[:, j] - off) / sc), 0, levels - 1), 0)
            codes[:, j - c0] = k
            err = (w[:, j] - (off + sc * k)) / u[j, j]
            errors[:, j - c0] = err
            w[:, j + 1:c1] -= np.outer(err, u[j, j + 1:c1])
        w[:, c1:] -= errors @ u[c0:c1, c1:]  # the block's errors, fed to every later column at once
        raw[:, b] = pack_codes(fmt.name, block_raw, codes)
    return raw.reshape(-1)


# ---- the sequential model pass ---------------------------------------------------------------


@dataclass
class HessianCollector:
    """Accumulates X^T X (float64) of the inputs of the weights in `wanted`, per expert for stacked ones."""

    wanted: set[str]
    hessians: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (weight, expert or -1) -> [n_in, n_in]

    def observe(self, inp: LinearInput) -> None:
        names = [n for n in inp.weights if n in self.wanted]
        if not names:
            return
        x = inp.x.astype(np.float64)
        xtx = x.T @ x  # [n_in, n_in]
        expert = inp.expert.index if inp.expert is not None else -1
        for name in names:
            key = (name, expert)
            if key in self.hessians:
                self.hessians[key] += xtx
            else:
                self.hessians[key] = xtx.copy()


Encoded = dict[str, list[np.ndarray]]  # GGUF name -> raw bytes, one array per expert (or one)


def gptq_model(plan: ConversionPlan, sequences: Sequence[np.ndarray], *, damp: float = DEFAULT_DAMP,
               n_threads: int = 0, progress: Callable[[str], None] | None = None) -> Encoded:
    """GPTQ-encode every weight matrix of `plan` whose planned type is a block format.

    The calibration `sequences` run through the model block by block: each block's Hessians come
    from inputs computed by the already-quantized blocks before it; then the block is quantized
    and run again, quantized, to make the next block's inputs. Returns the encoded tensors.
    """
    cfg = ForwardConfig.from_plan(plan)
    batch = Batch.of(sequences, cfg.n_vocab)
    rope_freqs = plan.read("rope_freqs.weight") if cfg.has_rope_freqs else None
    rope = RopeTables.build(cfg, batch.positions, rope_freqs)
    formats = {t.name: t.fmt for t in plan.tensors if _gptq_applies(t.fmt) and len(t.shape) >= 2}
    encoded: Encoded = {}
    hidden = embed(plan, batch)  # [n_tokens, n_embd]
    for index in range(cfg.n_layer):
        weights = load_block(plan, index)
        wanted = {weights.name(role) for role in weights.tensors if weights.name(role) in formats}
        collector = HessianCollector(wanted)
        run_block(cfg, weights, hidden.copy(), batch, rope, [collector])
        for role in list(weights.tensors):
            name = weights.name(role)
            if name not in wanted:
                continue
            weights.tensors[role] = _encode_into(encoded, name, weights.tensors[role], formats[name], collector, damp, n_threads)
        run_block(cfg, weights, hidden, batch, rope)  # the quantized block makes the next block's inputs
        if progress:
            progress(f"block {index + 1}/{cfg.n_layer}")
    out_name = cfg.output_weight
    if out_name in formats:
        collector = HessianCollector({out_name})
        head(plan, cfg, hidden, batch, Logits.NONE, [collector])
        _encode_into(encoded, out_name, plan.read(out_name), formats[out_name], collector, damp, n_threads)
    return encoded


def _gptq_applies(fmt: QuantFormat) -> bool:
    return fmt.block_size > 1  # block formats; F32/F16/BF16 are kept as they are


def _encode_into(encoded: Encoded, name: str, w: np.ndarray, fmt: QuantFormat, collector: HessianCollector,
                 damp: float, n_threads: int) -> np.ndarray:
    """GPTQ-encode `w` (stacked experts one by one), store the bytes, return the dequantized weight."""
    stacked = w.ndim == 3
    parts = w if stacked else w[None]
    raws, decoded = [], []
    for e, part in enumerate(parts):
        h = collector.hessians.get((name, e if stacked else -1))
        if h is None:  # no calibration token reached this expert: importance-free search
            raw = quantize(part, fmt, fit=Fit.SEARCH, n_threads=n_threads)
        else:
            raw = gptq_encode(part, h, fmt, damp=damp, n_threads=n_threads)
        raws.append(raw)
        decoded.append(decode(raw, fmt, n_threads=n_threads).reshape(part.shape))
    encoded[name] = raws
    return np.stack(decoded) if stacked else decoded[0]

