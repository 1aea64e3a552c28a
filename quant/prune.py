"""Pruning: zero weights (unstructured or N:M), drop whole blocks, drop MoE experts.

    spec text ("layers:2,wanda:0.5") -> parse_prune -> PruneSpec per step
    plan (lazy) -> one calibration pass (when a step needs data) -> the plan's tensors re-wired:
                   weights zeroed as they stream, blocks renamed / left out, experts sliced out

Pruning runs on a `ConversionPlan` before quantization: it changes what `plan.read` and the
writer see (and the plan's hyper-parameters and metadata), so everything after it (calibration
for imatrix / GPTQ, the type allocation, the writer) sees the pruned model.

Methods (one public function each; the pure ones work on one float32 matrix [n_out, n_in]):
- `prune_magnitude`: the smallest |W| of the whole matrix, at a sparsity.
- `prune_wanda`: score |W_ij| * ||X_j||_2 (the L2 norm of input column j over the calibration
  tokens), the lowest-scoring weights of each output row (Sun et al., 2023).
- `prune_n_m`: N of every M consecutive weights of a row are kept (2:4, 4:8), by either score.
- `prune_layers`: drop the blocks whose output is most like their input, block influence
  BI = 1 - mean_t cos(x_t, block(x)_t) on the calibration text (ShortGPT, Men et al., 2024); the
  rest are renumbered and `block_count` follows.
- `prune_experts`: in every MoE block drop the experts the calibration tokens gave the least
  routing weight (sum over tokens of the weight the router gives the expert when it is among the
  top k, so frequency and weight both count), or (`experts:F:loss`) whose removal loses the least
  of the block's output, sum over tokens of ||g_te * expert_e(x_t)||^2; the router rows go with
  them, `expert_count` follows, and `expert_used_count` is lowered if fewer experts remain.

All statistics (per-column activation norms, block influence, routing weight) come from one pass
of the numpy forward pass (`edgeai.quant.calibrate.collect_statistics`), on the unpruned model.
Weights zeroed here stay zero in types without a per-block minimum (F16, Q8_0, Q4_0, Q5_0, ...);
types with one (Q4_1, Q4_K, Q5_K) store them as that block's nearest level.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from edgeai.errors import OptionError
from edgeai.quant.forward import BlockOutput, ForwardConfig, LinearInput, route_tokens

if TYPE_CHECKING:
    from edgeai.converters.plan import ConversionPlan
    from edgeai.quant.calibrate import ActivationStats

log = logging.getLogger(__name__)

__all__ = [
    "BlockInfluence",
    "ExpertRouting",
    "ExpertScore",
    "PruneKind",
    "PruneSpec",
    "Score",
    "parse_prune",
    "prunable",
    "prune_experts",
    "prune_layers",
    "prune_magnitude",
    "prune_n_m",
    "prune_plan",
    "prune_wanda",
]


# ---- the spec ------------------------------------------------------------------------------


class Score(str, enum.Enum):
    """What ranks the weights of a matrix."""

    MAGNITUDE = "magnitude"  # |W|
    WANDA = "wanda"  # |W| * ||X_col||_2 (needs calibration)


class ExpertScore(str, enum.Enum):
    """What ranks the experts of a block."""

    ROUTING = "routing"  # routing weight the calibration tokens gave it (frequency x weight)
    LOSS = "loss"  # squared norm of its weighted output: the reconstruction error of dropping it


class PruneKind(str, enum.Enum):
    UNSTRUCTURED = "unstructured"
    N_M = "n:m"
    LAYERS = "layers"
    EXPERTS = "experts"


@dataclass(frozen=True)
class PruneSpec:
    """One pruning step, parsed from `--prune` (see `parse_prune`)."""

    kind: PruneKind
    score: Score | None = None  # UNSTRUCTURED and N_M
    sparsity: float = 0.0  # UNSTRUCTURED: fraction of weights zeroed; EXPERTS: fraction of experts dropped
    n: int = 0  # N_M: weights kept in every group of m
    m: int = 0
    count: int = 0  # LAYERS: blocks dropped
    expert_score: ExpertScore = ExpertScore.ROUTING  # EXPERTS

    @property
    def needs_calibration(self) -> bool:
        return self.kind in (PruneKind.LAYERS, PruneKind.EXPERTS) or self.score is Score.WANDA

    def __str__(self) -> str:
        if self.kind is PruneKind.UNSTRUCTURED:
            return f"{self.score.value}:{self.sparsity:g}"
        if self.kind is PruneKind.N_M:
            return f"{self.score.value}:{self.n}:{self.m}"
        if self.kind is PruneKind.LAYERS:
            return f"layers:{self.count}"
        loss = ":loss" if self.expert_score is ExpertScore.LOSS else ""
        return f"experts:{self.sparsity:g}{loss}"


GRAMMAR = (
    "magnitude:S | wanda:S (S in (0,1): fraction of weights zeroed) | N:M, magnitude:N:M, wanda:N:M "
    "(N of every M weights of a row kept; plain N:M ranks by magnitude) | layers:K (drop K blocks) | "
    "experts:F[:routing|:loss] (drop fraction F of each MoE block's experts, least routing weight or "
    "least output lost); join steps with commas, e.g. layers:2,wanda:0.5"
)


def _bad(text: str, why: str) -> OptionError:
    return OptionError(f"--prune {text!r}: {why}; the grammar is {GRAMMAR}")


def _fraction(text: str, value: str, what: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise _bad(text, f"{value!r} is not a number") from None
    if not 0.0 < f < 1.0:
        raise _bad(text, f"{what} {value} is outside (0, 1)")
    return f


def _integer(text: str, value: str, what: str) -> int:
    if not value.isdigit():
        raise _bad(text, f"{what} {value!r} is not a positive integer")
    return int(value)


def _parse_one(text: str) -> PruneSpec:
    parts = [p.strip().lower() for p in text.split(":")]
    head = parts[0]
    if head in (s.value for s in Score):
        score = Score(head)
        if len(parts) == 2:
            return PruneSpec(PruneKind.UNSTRUCTURED, score, sparsity=_fraction(text, parts[1], "sparsity"))
        if len(parts) == 3:
            return _n_m(text, score, parts[1], parts[2])
        raise _bad(text, f"{head} takes a sparsity or N:M")
    if head == "layers":
        if len(parts) != 2:
            raise _bad(text, "layers takes one count")
        count = _integer(text, parts[1], "layer count")
        if count == 0:
            raise _bad(text, "dropping 0 layers prunes nothing")
        return PruneSpec(PruneKind.LAYERS, count=count)
    if head == "experts":
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in (e.value for e in ExpertScore)):
            raise _bad(text, "experts takes a fraction and optionally routing or loss")
        return PruneSpec(PruneKind.EXPERTS, sparsity=_fraction(text, parts[1], "expert fraction"),
                         expert_score=ExpertScore(parts[2]) if len(parts) == 3 else ExpertScore.ROUTING)
    if len(parts) == 2 and head.isdigit():
        return _n_m(text, Score.MAGNITUDE, parts[0], parts[1])
    raise _bad(text, f"unknown method {head!r}")


def _n_m(text: str, score: Score, n_text: str, m_text: str) -> PruneSpec:
    n, m = _integer(text, n_text, "N"), _integer(text, m_text, "M")
    if not 0 < n < m:
        raise _bad(text, f"N:M needs 0 < N < M (N weights kept of every M), got {n}:{m}")
    return PruneSpec(PruneKind.N_M, score, n=n, m=m)


def parse_prune(text: str | Sequence[PruneSpec] | None) -> tuple[PruneSpec, ...]:
    """The steps of a `--prune` text: comma-separated, at most one weight step (unstructured or
    N:M), one `layers` and one `experts`. OptionError (naming the grammar) on anything else."""
    if text is None:
        return ()
    if not isinstance(text, str):
        return tuple(text)
    steps = tuple(_parse_one(part) for part in text.split(",") if part.strip())
    if not steps:
        raise _bad(text, "no pruning step given")
    groups = [PruneKind.LAYERS if s.kind is PruneKind.LAYERS else PruneKind.EXPERTS if s.kind is PruneKind.EXPERTS
              else PruneKind.UNSTRUCTURED for s in steps]
    if len(set(groups)) != len(groups):
        raise _bad(text, "give at most one weight step (S or N:M), one layers:K and one experts:F")
    return steps


# ---- pure pruning of one matrix -------------------------------------------------------------


def _zero_lowest_per_row(w: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """w with the k lowest-scoring entries of each row (last axis) set to 0 (a copy)."""
    out = np.array(w, dtype=np.float32)
    if k > 0:
        idx = np.argpartition(score, k - 1, axis=-1)[..., :k]
        np.put_along_axis(out, idx, 0.0, axis=-1)
    return out


def prune_magnitude(w: np.ndarray, sparsity: float) -> np.ndarray:
    """`w` with round(sparsity * w.size) of its smallest-magnitude weights set to 0, over the whole matrix."""
    k = int(round(sparsity * w.size))
    return _zero_lowest_per_row(w.reshape(1, -1), np.abs(w).reshape(1, -1), k).reshape(w.shape)


def _wanda_score(w: np.ndarray, col_norm: np.ndarray | None) -> np.ndarray:
    """|W_ij| * ||X_j||_2 for w [n_out, n_in], col_norm [n_in] (None: plain |W|)."""
    return np.abs(w) if col_norm is None else np.abs(w) * col_norm[None, :].astype(np.float32)


def prune_wanda(w: np.ndarray, col_norm: np.ndarray, sparsity: float) -> np.ndarray:
    """Wanda: `w` [n_out, n_in] with round(sparsity * n_in) weights of each output row set to 0,
    those with the lowest |W_ij| * col_norm[j] (col_norm [n_in]: each input column's L2 norm over
    the calibration tokens)."""
    k = int(round(sparsity * w.shape[1]))
    return _zero_lowest_per_row(w, _wanda_score(w, col_norm), k)


def prune_n_m(w: np.ndarray, n: int, m: int, col_norm: np.ndarray | None = None) -> np.ndarray:
    """N:M sparsity: in every group of `m` consecutive weights of a row of `w` [n_out, n_in], the
    `n` highest-scoring are kept (score |W|, or Wanda's |W| * col_norm when col_norm [n_in] is given).
    n_in must be a multiple of m."""
    n_out, n_in = w.shape
    assert n_in % m == 0, "callers check that M divides the row (see prune_plan)"
    score = _wanda_score(w, col_norm).reshape(n_out, n_in // m, m)
    return _zero_lowest_per_row(w.reshape(n_out, n_in // m, m), score, m - n).reshape(w.shape)


# ---- which tensors ---------------------------------------------------------------------------

# The matrices of a block's linear layers. Left dense: the embedding and output (shared by every
# token), norms and biases (1-D), and routers (a change there changes which experts run).
_PRUNABLE = re.compile(r"blk\.\d+\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down)(_exps|_shexp)?)\.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def prunable(name: str) -> bool:
    """Whether weight pruning (unstructured or N:M) applies to tensor `name` (GGUF name)."""
    return _PRUNABLE.fullmatch(name) is not None


# ---- calibration observers --------------------------------------------------------------------


class BlockInfluence:
    """Observer: block influence BI_i = 1 - mean over tokens of cos(block input, block output)."""

    def __init__(self) -> None:
        self.cos_sum: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def observe(self, inp: LinearInput) -> None:  # only whole blocks matter here
        pass

    def observe_block(self, out: BlockOutput) -> None:
        a, b = out.before.astype(np.float64), out.after.astype(np.float64)  # [n_tokens, n_embd]
        denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        cos = np.einsum("ij,ij->i", a, b) / denom  # [n_tokens]
        self.cos_sum[out.index] = self.cos_sum.get(out.index, 0.0) + float(cos.sum())
        self.tokens[out.index] = self.tokens.get(out.index, 0) + cos.size

    def influence(self, n_layer: int) -> np.ndarray:
        """BI of every block, [n_layer]; lower means the block changes its input less."""
        return np.array([1.0 - self.cos_sum[i] / self.tokens[i] for i in range(n_layer)])


class ExpertRouting:
    """Observer: per MoE block and expert, how many tokens chose it and the routing weight they gave
    it; with `loss`, also the squared norm of its weighted output (what dropping it would lose)."""

    def __init__(self, cfg: ForwardConfig, loss: bool = False) -> None:
        self.cfg = cfg
        self.track_loss = loss
        self._inputs: dict[int, list[np.ndarray]] = {}  # router input rows of the running block
        self._down: dict[tuple[int, int], list[np.ndarray]] = {}  # (block, expert) -> ffn_down_exps input rows
        self.frequency: dict[int, np.ndarray] = {}  # block -> [n_expert] tokens routed
        self.weight: dict[int, np.ndarray] = {}  # block -> [n_expert] sum of routing weights
        self.loss: dict[int, np.ndarray] = {}  # block -> [n_expert] sum_t ||g_te * expert_e(x_t)||^2

    def observe(self, inp: LinearInput) -> None:
        for name in inp.weights:
            match = _BLOCK.fullmatch(name)
            if match and match.group(2) == "ffn_gate_inp.weight":
                self._inputs.setdefault(int(match.group(1)), []).append(np.array(inp.x))
            elif self.track_loss and match and match.group(2) == "ffn_down_exps.weight" and inp.expert:
                self._down.setdefault((int(match.group(1)), inp.expert.index), []).append(np.array(inp.x))

    def observe_block(self, out: BlockOutput) -> None:
        rows = self._inputs.pop(out.index, None)
        if not rows:
            return
        h = np.concatenate(rows)  # [n_tokens, n_embd], the router's input
        chosen, route = route_tokens(self.cfg, out.weights["ffn_gate_inp.weight"], h)  # [n_tokens, top_k]
        n = self.cfg.n_expert
        self.frequency[out.index] = np.bincount(chosen.ravel(), minlength=n)
        self.weight[out.index] = np.bincount(chosen.ravel(), weights=route.ravel().astype(np.float64), minlength=n)
        if not self.track_loss:
            return
        down = out.weights["ffn_down_exps.weight"]  # [n_expert, n_embd, n_ff_exp]
        loss = np.zeros(n)
        for e in range(n):
            parts = self._down.pop((out.index, e), None)
            if not parts:
                continue
            # the forward pass sends an expert's rows span by span, tokens in order: the same
            # order as np.nonzero over the whole batch
            rows, slot = np.nonzero(chosen == e)
            y = route[rows, slot][:, None] * (np.concatenate(parts) @ down[e].T)  # [n_rows, n_embd]
            loss[e] = float(np.square(y, dtype=np.float64).sum())
        self.loss[out.index] = loss


# ---- re-wiring the plan ----------------------------------------------------------------------


def _map_matrices(chunks: Callable[[], Iterator[np.ndarray]], fn: Callable[[np.ndarray, int], np.ndarray]):
    """Chunks with `fn(matrix, expert_index)` applied to each matrix: a 2-D chunk is one matrix
    (one expert of a per-expert source), a 3-D chunk a stack of them (a GGUF source)."""

    def mapped() -> Iterator[np.ndarray]:
        index = 0
        for chunk in chunks():
            if chunk.ndim == 3:
                yield np.stack([fn(chunk[j], index + j) for j in range(chunk.shape[0])])
                index += chunk.shape[0]
            else:
                yield fn(chunk.reshape(-1, chunk.shape[-1]), index).reshape(chunk.shape)
                index += 1

    return mapped


def _select_matrices(chunks: Callable[[], Iterator[np.ndarray]], keep: np.ndarray, n: int, stacked: bool):
    """Chunks of only the matrices (experts, or rows of a router when not `stacked`) in `keep`."""
    keep_set = set(int(k) for k in keep)

    def selected() -> Iterator[np.ndarray]:
        index = 0
        for chunk in chunks():
            if not stacked:  # the router [n_expert, n_embd] arrives whole
                assert chunk.shape[0] == n
                yield np.ascontiguousarray(chunk[keep])
                continue
            count = chunk.shape[0] if chunk.ndim == 3 else 1
            ids = [j for j in range(count) if index + j in keep_set]
            if ids:
                yield np.ascontiguousarray(chunk[ids]) if chunk.ndim == 3 else chunk
            index += count

    return selected


def _set_kv(plan: ConversionPlan, key: str, value: int) -> None:
    for i, meta in enumerate(plan.kv):
        if meta.key == key:
            plan.kv[i] = dataclasses.replace(meta, value=value)
            return
    raise AssertionError(f"{key} is not in the plan's metadata")


def _wanda_norm(stats: ActivationStats | None, name: str, expert: int) -> np.ndarray | None:
    """||X_j||_2 up to a constant (sqrt of mean x^2), or None where no token reached the weight."""
    if stats is None or name not in stats:
        return None
    mean_sq = stats.importance(name)
    if mean_sq.ndim == 2:
        mean_sq = mean_sq[expert]
    return np.sqrt(mean_sq) if float(mean_sq.sum()) > 0.0 else None


def _prune_weights(plan: ConversionPlan, spec: PruneSpec, stats: ActivationStats | None) -> dict[str, object]:
    """Wire weight pruning into every prunable matrix's chunks; returns the recipe entry."""
    pruned = total = matrices = 0
    unreached: list[str] = []
    for t in plan.tensors:
        if not prunable(t.name):
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        n_out, n_in = t.shape[-2], t.shape[-1]
        if spec.kind is PruneKind.N_M:
            per_matrix = n_out * n_in // spec.m * (spec.m - spec.n)
        elif spec.score is Score.WANDA:
            per_matrix = n_out * int(round(spec.sparsity * n_in))
        else:
            per_matrix = int(round(spec.sparsity * n_out * n_in))
        pruned += per_matrix * n_mat
        total += n_out * n_in * n_mat
        matrices += n_mat
        if spec.score is Score.WANDA:
            unreached += [f"{t.name}[{e}]" for e in range(n_mat) if _wanda_norm(stats, t.name, e) is None]

        def fn(w: np.ndarray, expert: int, name: str = t.name) -> np.ndarray:
            norm = _wanda_norm(stats, name, expert) if spec.score is Score.WANDA else None
            if spec.kind is PruneKind.N_M:
                return prune_n_m(w, spec.n, spec.m, norm)
            if norm is None:  # magnitude, or an expert no calibration token reached
                return prune_wanda(w, np.ones(w.shape[1], np.float32), spec.sparsity) if spec.score is Score.WANDA \
                    else prune_magnitude(w, spec.sparsity)
            return prune_wanda(w, norm, spec.sparsity)

        t.chunks = _map_matrices(t.chunks, fn)
    if unreached:
        log.warning("prune: %d expert matri(ces) got no calibration tokens and are ranked by |W| (e.g. %s)",
                    len(unreached), unreached[0])
    log.info("prune: %s zeroes %d of %d weights in %d matrices", spec, pruned, total, matrices)
    return {"step": str(spec), "method": spec.score.value, "pattern": f"{spec.n}:{spec.m}" if spec.kind is PruneKind.N_M
            else "unstructured", "sparsity": round(pruned / total, 6), "pruned_weights": pruned, "weights": total,
            "matrices": matrices, "matrices_without_calibration": len(unreached)}


def prune_layers(plan: ConversionPlan, drop: Sequence[int]) -> None:
    """Drop blocks `drop` from the plan: their tensors are left out, the rest renumbered in order,
    and `{arch}.block_count` and the hyper-parameters follow."""
    hp = plan.hparams
    assert hp is not None and 0 < len(set(drop)) < hp.n_layer
    dropped = set(drop)
    new_index = {old: new for new, old in enumerate(i for i in range(hp.n_layer) if i not in dropped)}
    tensors = []
    for t in plan.tensors:
        match = _BLOCK.fullmatch(t.name)
        if match is None:
            tensors.append(t)
        elif int(match.group(1)) not in dropped:
            t.name = f"blk.{new_index[int(match.group(1))]}.{match.group(2)}"
            tensors.append(t)
    plan.tensors = tensors
    plan.hparams = dataclasses.replace(hp, n_layer=len(new_index))
    _set_kv(plan, f"{plan.arch}.block_count", len(new_index))


def prune_experts(plan: ConversionPlan, keep: dict[int, np.ndarray]) -> None:
    """Keep only experts `keep[block]` (sorted ids, the same count in every block) of each MoE
    block: expert stacks and router rows are sliced; `expert_count`, and `expert_used_count` when
    fewer experts than it remain, follow."""
    hp = plan.hparams
    assert hp is not None and hp.n_expert > 0
    (n_keep,) = {len(k) for k in keep.values()}
    for t in plan.tensors:
        match = _BLOCK.fullmatch(t.name)
        if match is None or int(match.group(1)) not in keep:
            continue
        ids = keep[int(match.group(1))]
        role = match.group(2)
        if role == "ffn_gate_inp.weight":
            t.chunks = _select_matrices(t.chunks, ids, hp.n_expert, stacked=False)
        elif role.endswith("_exps.weight"):
            t.chunks = _select_matrices(t.chunks, ids, hp.n_expert, stacked=True)
        else:
            continue
        assert t.shape[0] == hp.n_expert, (t.name, t.shape)
        t.shape = (n_keep, *t.shape[1:])
    n_used = min(hp.n_expert_used, n_keep)
    plan.hparams = dataclasses.replace(hp, n_expert=n_keep, n_expert_used=n_used)
    _set_kv(plan, f"{plan.arch}.expert_count", n_keep)
    _set_kv(plan, f"{plan.arch}.expert_used_count", n_used)


# ---- the whole step ---------------------------------------------------------------------------


def check_plan(plan: ConversionPlan, steps: Sequence[PruneSpec]) -> None:
    """Refuse steps this model cannot take (before any data is read): OptionError naming the fix."""
    hp = plan.hparams
    for spec in steps:
        if spec.needs_calibration and (plan.spec is None or hp is None):
            raise OptionError(f"--prune {spec}: architecture {plan.arch!r} has no spec in edgeai.converters, so edgeai "
                              "cannot run it on calibration text; use magnitude pruning")
        if spec.kind is PruneKind.N_M:
            for t in plan.tensors:
                if prunable(t.name) and t.shape[-1] % spec.m:
                    raise OptionError(f"--prune {spec}: tensor {t.name!r} has rows of {t.shape[-1]} weights, not a "
                                      f"multiple of M={spec.m}; choose an M that divides every row")
        if spec.kind is PruneKind.LAYERS and spec.count >= hp.n_layer:
            raise OptionError(f"--prune {spec}: the model has {hp.n_layer} blocks; at least one must remain, so "
                              f"drop at most {hp.n_layer - 1}")
        if spec.kind is PruneKind.EXPERTS:
            if hp.n_expert == 0:
                raise OptionError(f"--prune {spec}: {plan.source_files[0].name} is a dense model (no experts); "
                                  "expert pruning needs a mixture-of-experts model")
            drop = int(round(spec.sparsity * hp.n_expert))
            if drop == 0 or drop >= hp.n_expert:
                raise OptionError(f"--prune {spec}: {spec.sparsity:g} of {hp.n_expert} experts is {drop}; "
                                  f"give a fraction that drops between 1 and {hp.n_expert - 1} experts")


def _experts_to_keep(routing: ExpertRouting, score: ExpertScore, n_expert: int, n_drop: int) -> dict[int, np.ndarray]:
    keep = {}
    for block, weight in sorted(routing.weight.items()):
        primary = routing.loss[block] if score is ExpertScore.LOSS else weight
        # lowest score first; ties (e.g. experts never chosen) by frequency, then by id
        order = np.lexsort((np.arange(n_expert), routing.frequency[block], primary))
        keep[block] = np.sort(order[n_drop:])
    return keep


def prune_plan(plan: ConversionPlan, steps: Sequence[PruneSpec], text: str | None, *, n_ctx: int = 512,
               max_tokens: int | None = None) -> dict[str, object]:
    """Apply pruning `steps` to `plan` (in place, lazily: no tensor is read except by calibration).

    Args:
        plan: from `open_plan`; its tensors, hyper-parameters and metadata are changed.
        steps: from `parse_prune`.
        text: calibration text, needed by wanda, layers and experts.
        n_ctx, max_tokens: calibration chunking (`edgeai.quant.calibrate.calibration_set`).

    Returns:
        What the artifact's recipe records under "pruning".

    Raises:
        OptionError: a step this model cannot take, or calibration text missing.
        CalibrationError: the text is too short.
    """
    steps = tuple(steps)
    check_plan(plan, steps)
    record: dict[str, object] = {"spec": ",".join(str(s) for s in steps)}
    stats = influence = routing = None
    if any(s.needs_calibration for s in steps):
        if text is None:
            needing = next(s for s in steps if s.needs_calibration)
            raise OptionError(f"--prune {needing} needs calibration text: pass --calib FILE")
        from edgeai.quant.calibrate import DEFAULT_MAX_TOKENS, collect_statistics

        observers: list = []
        if any(s.kind is PruneKind.LAYERS for s in steps):
            influence = BlockInfluence()
            observers.append(influence)
        if any(s.kind is PruneKind.EXPERTS for s in steps):
            loss = any(s.kind is PruneKind.EXPERTS and s.expert_score is ExpertScore.LOSS for s in steps)
            routing = ExpertRouting(ForwardConfig.from_plan(plan), loss=loss)
            observers.append(routing)
        stats = collect_statistics(plan, text, n_ctx=n_ctx, max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
                                   observers=observers)
        record["calibration"] = stats.recipe()
    # Weight pruning is wired first, on the original names and expert ids its statistics use;
    # dropping blocks and experts then wraps (or leaves out) the pruned tensors.
    for spec in steps:
        if spec.kind in (PruneKind.UNSTRUCTURED, PruneKind.N_M):
            record["weights"] = _prune_weights(plan, spec, stats)
    for spec in steps:
        if spec.kind is PruneKind.EXPERTS:
            hp = plan.hparams
            keep = _experts_to_keep(routing, spec.expert_score, hp.n_expert, int(round(spec.sparsity * hp.n_expert)))
            prune_experts(plan, keep)
            record["experts"] = {
                "step": str(spec), "score": spec.expert_score.value, "expert_count": [hp.n_expert, plan.hparams.n_expert],
                "expert_used_count": [hp.n_expert_used, plan.hparams.n_expert_used],
                "dropped": {str(b): sorted(set(range(hp.n_expert)) - set(k.tolist())) for b, k in keep.items()},
            }
            if plan.hparams.n_expert_used < hp.n_expert_used:
                log.warning("prune: %d experts remain per block; expert_used_count lowered from %d to %d",
                            plan.hparams.n_expert, hp.n_expert_used, plan.hparams.n_expert_used)
            log.info("prune: kept %d of %d experts per block", plan.hparams.n_expert, hp.n_expert)
    for spec in steps:
        if spec.kind is PruneKind.LAYERS:
            n_layer = plan.hparams.n_layer
            bi = influence.influence(n_layer)
            drop = sorted(int(i) for i in np.argsort(bi, kind="stable")[: spec.count])
            prune_layers(plan, drop)
            record["layers"] = {"step": str(spec), "block_count": [n_layer, plan.hparams.n_layer], "dropped": drop,
                                "influence": [round(float(b), 6) for b in bi]}
            log.info("prune: dropped blocks %s (influence %s)", drop, np.round(bi[drop], 4).tolist())
    return record
