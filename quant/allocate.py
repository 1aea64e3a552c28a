"""Mixed precision for a size target: choose each tensor's type so the whole file meets a bits-per-
weight budget with the least estimated error.

The error of a tensor in a type is measured, not guessed: the tensor is quantized in every
candidate type and the squared error is summed per input column, weighted by that column's
importance (the imatrix statistic when calibration data is given, else uniform), which is the
expected squared error of the layer's output. The budget is then spent greedily: starting from each
tensor's smallest type, the upgrade that removes the most error per extra byte goes first (on each
tensor's lower convex hull of (bytes, error), where this greedy is optimal for the relaxed problem).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from edgeai.errors import OptionError
from edgeai.quant.formats import FORMATS, Fit, QuantFormat, decode, quantize

if TYPE_CHECKING:
    from edgeai.converters.plan import ConversionPlan

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("q4_0", "q4_1", "iq4_nl", "iq4_xs", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0")

Importance = Callable[[str, int], "np.ndarray | None"]  # (weight, expert) -> per-column weights


@dataclass(frozen=True)
class Allocation:
    types: dict[str, str]  # tensor -> chosen format name
    n_bytes: int  # tensor data bytes of the whole file
    n_weights: int
    estimated_error: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / self.n_weights


def measured_errors(w: np.ndarray, candidates: Sequence[QuantFormat], importance: list[np.ndarray | None]) -> dict[str, float]:
    """Importance-weighted squared error of `w` (2-D, or stacked experts [n_expert, rows, cols]) in each candidate."""
    parts = w if w.ndim == 3 else w[None]
    errors = {}
    for fmt in candidates:
        total = 0.0
        for part, imp in zip(parts, importance):
            raw = quantize(part, fmt, fit=Fit.SEARCH, importance=imp)
            diff = decode(raw, fmt).reshape(part.shape) - part
            col = np.einsum("ij,ij->j", diff, diff, dtype=np.float64)  # [cols] squared error per input column
            total += float(col @ (imp if imp is not None else np.ones_like(col)))
        errors[fmt.name] = total
    return errors


def _hull(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """Lower convex hull of (bytes, error, type), bytes increasing, error strictly decreasing."""
    options = sorted(options)
    pruned: list[tuple[int, float, str]] = []
    for opt in options:
        if pruned and opt[1] >= pruned[-1][1]:
            continue  # more bytes for no less error
        while len(pruned) >= 2:
            (b0, e0, _), (b1, e1, _) = pruned[-2], pruned[-1]
            # drop the middle point if it lies above the segment from b0 to opt
            if (e0 - e1) * (opt[0] - b1) <= (e1 - opt[1]) * (b1 - b0):
                pruned.pop()
            else:
                break
        pruned.append(opt)
    return pruned


def allocate(plan: ConversionPlan, target_bpw: float, *, candidates: Sequence[str] = DEFAULT_CANDIDATES,
             importance: Importance | None = None, progress: Callable[[str], None] | None = None) -> Allocation:
    """Types for every tensor of `plan` meeting `target_bpw` (8 * tensor bytes / weights) with the least
    estimated error. Tensors the plan keeps in F32 (norms, routers) stay so and count in the budget.

    Raises OptionError when even the smallest types exceed the target (naming the smallest reachable).
    """
    fixed_bytes, n_weights = 0, 0
    hulls: dict[str, list[tuple[int, float, str]]] = {}
    for t in plan.tensors:
        n = int(np.prod(t.shape, dtype=np.int64))
        n_weights += n
        usable = [FORMATS[c] for c in candidates if t.shape[-1] % FORMATS[c].block_size == 0]
        if t.fmt.name == "f32" or len(t.shape) < 2 or not usable:
            fixed_bytes += t.nbytes
            continue
        w = plan.read(t.name)
        n_parts = w.shape[0] if w.ndim == 3 else 1
        imps = [importance(t.name, e) if importance else None for e in range(n_parts)]
        errors = measured_errors(w, usable, imps)
        hulls[t.name] = _hull([(fmt.nbytes(n), errors[fmt.name], fmt.name) for fmt in usable])
        if progress:
            progress(t.name)
    smallest = fixed_bytes + sum(h[0][0] for h in hulls.values())
    budget = int(target_bpw * n_weights / 8)
    if smallest > budget:
        raise OptionError(
            f"--target-bpw {target_bpw} cannot be reached: the smallest mix of {', '.join(candidates)} is "
            f"{8 * smallest / n_weights:.3f} bits per weight"
        )
    level = {name: 0 for name in hulls}
    used = smallest
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], level[name]
        if i + 1 < len(h):
            gain = (h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0])  # error removed per extra byte
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], level[name]
        extra = h[i + 1][0] - h[i][0]
        if used + extra > budget:
            continue  # this upgrade does not fit; cheaper ones of other tensors may
        used += extra
        level[name] = i + 1
        push(name)
    types = {t.name: t.fmt.name for t in plan.tensors}
    types.update({name: hulls[name][level[name]][2] for name in hulls})
    error = sum(hulls[name][level[name]][1] for name in hulls)
    result = Allocation(types, used, n_weights, error)
    log.info("allocation: %.3f bits per weight (target %.3f)", result.bits_per_weight, target_bpw)
    return result
