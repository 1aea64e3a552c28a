"""The method step between planning and writing: pruning, calibration statistics, AWQ, GPTQ and
the bits-per-weight allocation, applied to a `ConversionPlan` for either writer.

    open_plan (converters.plan) -> prepare (here) -> write (converters.convert: GGUF; converters.onnx_export: ONNX)

`prepare` changes the plan in place (pruned tensors, AWQ-scaled weights, re-chosen types, the
recipe record) and returns what the writer's encoders need: the per-column importance lookup and
GPTQ's already-encoded tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from edgeai.converters.plan import ConversionPlan
from edgeai.errors import OptionError
from edgeai.quant.recipes import Method, Recipe, tensor_type

if TYPE_CHECKING:
    from edgeai.quant.prune import PruneSpec

log = logging.getLogger(__name__)

# (weight name, expert index) -> per-column weights for the block quantizer, or None (uniform)
ImportanceLookup = Callable[[str, int], "np.ndarray | None"]

# Types whose grid GPTQ's column-by-column rounding cannot use (non-uniform).
GRIDLESS = ("iq4_nl", "iq4_xs", "mxfp4")


# Calibration runs the model in numpy on chunks of calib_ctx tokens: attention holds a
# calib_ctx x calib_ctx score matrix per head, 16 GiB of float32 at 65,536 tokens.
MAX_CALIB_CTX = 2**16


def checked_knobs(threads: int, calib_ctx: int) -> tuple[int, int]:
    """(threads, calib_ctx) of a conversion, checked before any work (OptionError naming the option):
    threads 0 (every core) or 1.. (capped at the CPUs, `devices.checked_threads`), calib_ctx 2..MAX_CALIB_CTX."""
    from edgeai.devices import checked_threads
    from edgeai.options import checked_int

    threads = checked_int("threads", threads, minimum=0, why="0 uses every core")
    calib_ctx = checked_int("calib_ctx (--calib-ctx)", calib_ctx, minimum=2, maximum=MAX_CALIB_CTX,
                            why="tokens per calibration chunk; the forward pass holds a square of them per head")
    return (checked_threads(threads) if threads else 0), calib_ctx


@dataclass
class Prepared:
    """What the writer's encoders take from the method step."""

    importance: ImportanceLookup | None = None  # imatrix / AWQ: weights of each column's error
    encoded: dict[str, list[np.ndarray]] | None = None  # GPTQ: tensors already encoded, by name


def calibration_text(calib: str | Path | None, method: Method, prune_steps: Sequence[PruneSpec] = (),
                     also_needed_by: str | None = None) -> str | None:
    """The calibration text the method or a pruning step needs (None when none does); OptionError
    when it is missing, unreadable, or given to steps that ignore it. also_needed_by: the option of
    another step that needs it (--draft-of)."""
    pruning = next((s for s in prune_steps if s.needs_calibration), None)
    needed_by = f"--method {method.value}" if method.needs_calibration else f"--prune {pruning}" if pruning else \
        also_needed_by
    if needed_by is None:
        if calib is not None:
            raise OptionError(f"--calib is only used by calibrated methods and pruning; --method {method.value} ignores it")
        return None
    if calib is None:
        raise OptionError(f"{needed_by} needs a calibration text: pass --calib FILE")
    path = Path(calib)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OptionError(f"calibration text {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"calibration text {path} cannot be read as UTF-8: {exc}") from exc


def prepare(plan: ConversionPlan, recipe: Recipe, method: Method, *, calib: str | Path | None, calib_text: str | None,
            calib_ctx: int, prune_steps: Sequence[PruneSpec] = (), target_bpw: float | None = None,
            target_types: Sequence[str] | None = None, threads: int = 0,
            grid: Callable[[ConversionPlan], None] | None = None) -> Prepared:
    """Apply pruning and the calibration method to `plan` (in place) and return what the encoders need.

    grid: for a writer whose plan types are not its codes (ONNX: the plan is F32, MatMulNBits
    quantizes), sets the block formats AWQ and GPTQ quantize with; imatrix statistics are then always
    gathered. None (GGUF): the plan's types are the file's, imatrix is skipped when none of them uses
    importance, `target_bpw` re-chooses them, and GPTQ refuses the non-uniform IQ4 grids.
    """
    from threadpoolctl import threadpool_limits

    out = Prepared()
    calib_name = Path(calib).name if calib is not None else None
    # numpy's BLAS (the calibration forward pass, GPTQ, AWQ) gets the threads asked for: its default,
    # one thread per core, spin-waits and runs small products many times slower on a busy machine
    with threadpool_limits(limits=threads if threads > 0 else None, user_api="blas"):
        if prune_steps:  # before calibrating for quantization, which then sees the pruned model
            prune(plan, recipe, prune_steps, calib_text, calib_ctx, calib)
        if grid is None and method is Method.IMATRIX and target_bpw is None and not uses_importance(plan):
            # every type ignores importance (e.g. q8_0): calibrating would change no byte
            log.info("--method %s: no tensor type of this recipe uses calibration data; skipping it", method.value)
            plan.extra_recipe["calibration"] = {"skipped": "no tensor type of the recipe uses it", "file": calib_name}
        elif method is Method.IMATRIX or (grid is None and method.needs_calibration and target_bpw is not None):
            from edgeai.quant.calibrate import collect_statistics

            stats = collect_statistics(plan, calib_text, n_ctx=calib_ctx)
            plan.extra_recipe["calibration"] = {**stats.recipe(), "file": calib_name}
            out.importance = importance_lookup({name: stats.importance(name) for name in stats.columns})
        if target_bpw is not None:
            allocate(plan, target_bpw, out.importance, target_types)
        if method in (Method.AWQ, Method.GPTQ) and grid is not None:
            grid(plan)  # what the scale search / the column rounding quantizes with
        if method is Method.GPTQ:
            gridless = sorted({t.fmt.name for t in plan.tensors if t.fmt.name in GRIDLESS})
            if gridless:  # GPTQ rounds each column on a uniform grid; IQ4's is not
                raise OptionError(f"--method gptq does not write {', '.join(gridless)}; use --method imatrix or awq "
                                  "for them, or a recipe (or --target-types) without IQ4 or MXFP4 types")
            out.encoded = gptq(plan, calib_text, calib_ctx, calib_name, threads)
        if method is Method.AWQ:
            out.importance = awq(plan, calib_text, calib_ctx, calib_name, threads)
        if method not in (Method.IMATRIX, Method.AWQ):
            out.importance = None  # statistics gathered only to size the mix
    return out


def prune(plan: ConversionPlan, recipe: Recipe, steps: Sequence[PruneSpec], text: str | None, n_ctx: int,
          calib: str | Path | None) -> None:
    """Prune the plan (edgeai.quant.prune), record it, and re-type tensors whose block moved."""
    from edgeai.quant.prune import prune_plan

    record = prune_plan(plan, steps, text, n_ctx=n_ctx)
    if "calibration" in record:
        record["calibration"] = {**record["calibration"], "file": Path(calib).name}
    plan.extra_recipe["pruning"] = record
    if plan.hparams is not None:  # the recipe's per-layer rules count blocks: choose again
        has_output = any(t.name == "output.weight" for t in plan.tensors)
        for t in plan.tensors:
            choice = tensor_type(t.name, t.shape, recipe, n_blocks=plan.hparams.n_layer,
                                 has_experts=plan.hparams.n_expert > 0, has_output=has_output)
            t.fmt, t.fallback = choice.fmt, choice.fallback


def target_types(names: Sequence[str], target_bpw: float | None) -> tuple[str, ...]:
    """The --target-types names, checked: known block types, and only with --target-bpw."""
    from edgeai.quant.formats import format_by_name

    if target_bpw is None:
        raise OptionError("--target-types only narrows what --target-bpw chooses from; give --target-bpw too")
    types = tuple(format_by_name(n.strip()).name for n in names if n.strip())
    not_blocks = [t for t in types if format_by_name(t).block_size == 1]
    if not types or not_blocks:
        raise OptionError(f"--target-types needs block types such as q4_0,q4_k,q6_k,q8_0; got {', '.join(names)}")
    return types


def allocate(plan: ConversionPlan, target_bpw: float, importance: ImportanceLookup | None,
             types: Sequence[str] | None = None) -> None:
    """Re-type the plan's weight matrices for the size target (see edgeai.quant.allocate)."""
    from edgeai.quant.allocate import DEFAULT_CANDIDATES
    from edgeai.quant.allocate import allocate as choose
    from edgeai.quant.formats import FORMATS

    result = choose(plan, target_bpw, importance=importance, candidates=types or DEFAULT_CANDIDATES)
    for t in plan.tensors:
        t.fmt = FORMATS[result.types[t.name]]
        t.fallback = ""
    plan.extra_recipe["target_bpw"] = target_bpw
    if types:
        plan.extra_recipe["target_types"] = list(types)
    plan.extra_recipe["bits_per_weight"] = round(result.bits_per_weight, 4)


def gptq(plan: ConversionPlan, text: str, n_ctx: int, calib_name: str, threads: int) -> dict[str, list[np.ndarray]]:
    """Run GPTQ over the calibration text; returns the encoded bytes of every block-format matrix."""
    from edgeai.quant.calibrate import calibration_set
    from edgeai.quant.gptq import gptq_model

    calib = calibration_set(plan, text, n_ctx=n_ctx)
    plan.extra_recipe["calibration"] = {**calib.recipe(), "file": calib_name}
    return gptq_model(plan, calib.chunks, n_threads=threads, progress=lambda what: log.info("GPTQ: %s", what))


def awq(plan: ConversionPlan, text: str, n_ctx: int, calib_name: str, threads: int) -> ImportanceLookup:
    """Search AWQ scales on the calibration text and fold them into the plan's tensors; returns the
    importance of the scaled inputs for the writer's search."""
    from edgeai.quant.awq import awq_model
    from edgeai.quant.calibrate import calibration_set

    calib = calibration_set(plan, text, n_ctx=n_ctx)
    plan.extra_recipe["calibration"] = {**calib.recipe(), "file": calib_name}
    result = awq_model(plan, calib.chunks, n_threads=threads, progress=lambda what: log.info("AWQ: %s", what))
    result.apply(plan)
    plan.extra_recipe["awq"] = result.recipe()
    return importance_lookup(result.importance)


def uses_importance(plan: ConversionPlan) -> bool:
    """Whether any tensor is written in a type whose encoder weighs its error by importance."""
    from edgeai.quant.formats import takes_importance

    return any(takes_importance(t.fmt) for t in plan.tensors)


def importance_lookup(importance: Mapping[str, np.ndarray]) -> ImportanceLookup:
    """(weight name, expert index) -> per-column weights for the block quantizer, or None (uniform).

    `importance`: weight name -> mean x^2 of its input, [n_in] ([n_expert, n_in] for stacked experts).
    An expert that no calibration token reached has no statistic: it is quantized unweighted.
    """

    def lookup(name: str, expert: int) -> np.ndarray | None:
        if name not in importance:
            return None
        imp = importance[name]
        if imp.ndim == 2:
            imp = imp[expert]
        total = float(imp.sum())
        if not np.isfinite(total) or total <= 0.0:
            return None
        return imp.astype(np.float32)

    return lookup
