"""The converter: a checkpoint (Hugging Face folder or GGUF) -> a GGUF file, or an ONNX folder.

    read: open_plan (converters.plan) -> prepare: pruning, calibration (converters.pipeline)
      -> write: here for GGUF (header, then data streamed), converters.onnx_export for ONNX

The output appears only when complete: it is written to a temporary file beside OUT, fsynced and
renamed (see `edgeai.paths.atomic_output`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from gguf import GGUFValueType, LlamaFileType

from edgeai.converters.pipeline import GRIDLESS, ImportanceLookup, calibration_text, checked_knobs, prepare
from edgeai.converters.plan import ConversionPlan, open_plan
from edgeai.errors import OptionError, OutputError
from edgeai.gguf_writer import GGUFWriter
from edgeai.paths import atomic_output, check_not_source, default_model_path
from edgeai.quant.formats import Fit, quantize
from edgeai.quant.recipes import Method, OutType, Recipe, get_recipe, parse_method, parse_outtype
from edgeai.version import __version__

if TYPE_CHECKING:
    from edgeai.quant.prune import PruneSpec

log = logging.getLogger(__name__)

def _file_type(recipe: Recipe, mixed: bool) -> LlamaFileType:
    """general.file_type: llama.cpp's name for the mix (informational; each tensor states its type)."""
    if mixed:  # a --target-bpw allocation is no named mix
        return LlamaFileType.GUESSED
    if recipe.name == "f32":
        return LlamaFileType.ALL_F32
    return getattr(LlamaFileType, f"MOSTLY_{recipe.name.upper()}", LlamaFileType.GUESSED)


_SHA_PLACEHOLDER = "0" * 64


def _sha256_files(files: list[Path]) -> str:
    """`name:hex` for each source file, comma-separated (checkable with sha256sum)."""
    parts = []
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        parts.append(f"{f.name}:{h.hexdigest()}")
    return ",".join(parts)


# progress(bytes done, bytes in all, what): called as the output is written (the CLI draws a bar)
Progress = Callable[[int, int, str], None]


def convert(
    src: str | Path | None = None,
    output: str | Path | None = None,
    *,
    outtype: str | OutType | None = None,
    quant: str | Recipe | None = None,
    method: str | Method = Method.RTN,
    calib: str | Path | None = None,
    calib_ctx: int = 512,
    target_bpw: float | None = None,
    prune: str | Sequence[PruneSpec] | None = None,
    target_types: Sequence[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    trust_pickle: bool = False,
    threads: int = 0,
    format: str = "gguf",
    block_size: int = 32,
    device: str | None = None,
    draft_of: str | Path | None = None,
    draft_layers: int | None = None,
) -> Path:
    """Convert a checkpoint to a GGUF file that llama.cpp and edgeai's runtime load, or (format="onnx")
    to an ONNX folder that onnxruntime runs (`edgeai.converters.onnx_export.export_onnx`).

    Args:
        src: a Hugging Face folder (config.json, safetensors, tokenizer files) or a GGUF file;
            None means the bundled default model.
        output: the GGUF file to write. It appears only once complete.
        outtype: one element type for every weight matrix: f32, f16 (default), bf16 or q8_0.
        quant: a quantization recipe instead (see `edgeai.quant.recipes.RECIPES`: q4_0, q4_k_m, ...).
            A checkpoint that ships its experts in MXFP4 (gpt-oss) defaults to mxfp4_moe: its expert
            bytes are copied (nibbles reordered, no value re-encoded), the rest Q8_0; under any
            other type its experts are decoded to float32 and encoded again.
        method: how block types choose their codes: rtn (no calibration data), imatrix (the
            squared error of each input column weighted by its mean x^2 on the calibration text;
            skipped when no type of the recipe uses it, e.g. q8_0), awq (activation-aware input
            channel scales folded into the norm or projection before, then imatrix,
            `edgeai.quant.awq`) or gptq (column-by-column rounding with Hessian error feedback,
            `edgeai.quant.gptq`).
        calib: a UTF-8 text file for the methods and pruning steps that need calibration.
        calib_ctx: tokens per calibration chunk.
        target_bpw: choose each weight matrix's type (Q4_0 ... Q8_0) so the file has this many bits
            per weight with the least measured error (`edgeai.quant.allocate`); `quant` then only
            sets what stays F32.
        prune: pruning before quantization (`edgeai.quant.prune.parse_prune`), e.g. "wanda:0.5",
            "2:4", "layers:4", "experts:0.25", or steps joined by commas ("layers:2,wanda:0.5").
        target_types: the block types `target_bpw` may choose from (default: every one edgeai writes).
        force: overwrite `output` if it exists.
        progress: called as the output is written, with (bytes done, bytes in all, what); the CLI
            draws its progress bar with it (library code draws nothing).
        trust_pickle: allow PyTorch `.bin` checkpoints (loaded with weights_only=True).
        threads: threads for quantization; 0 uses every core.
        format: "gguf" (a file) or "onnx" (a folder; `quant` is then fp32, fp16, int8 or int4).
        block_size: weights per scale of ONNX int8/int4 weights (32, 64 or 128).
        device: ONNX only: the device profile whose CPU sets MatMulNBits' accuracy_level (None:
            this machine; `edgeai.converters.onnx_export.accuracy_level_for`).
        draft_of: make a draft model for speculative decoding with this target GGUF
            (`edgeai.converters.draft`): `src` (the checkpoint the target was converted from) with
            fewer blocks, the ones that change the hidden state least on `calib` (needed), and
            `quant` q4_0 unless given; the vocabulary is checked against the target's first.
            Load it with `edgeai.load(target, speculative=output)`.
        draft_layers: blocks the draft keeps (default: three quarters of the source's, rounded up).

    Returns:
        The path written.
    """
    threads, calib_ctx = checked_knobs(threads, calib_ctx)
    target = _draft_target(draft_of, draft_layers, format, prune, calib)
    if target is not None and quant is None and outtype is None and target_bpw is None:
        from edgeai.converters.draft import DRAFT_QUANT

        quant = DRAFT_QUANT
    # ---- ONNX export (edgeai.converters.onnx_export) ----
    if str(format).lower() == "onnx":
        if outtype is not None or target_bpw is not None or target_types is not None:
            raise OptionError("--format onnx takes --quant fp32|fp16|int8|int4; drop --outtype / --target-bpw / --target-types")
        from edgeai.converters.onnx_export import export_onnx

        return export_onnx(src, output, quant=quant or "fp32", block_size=block_size, method=method, calib=calib,
                           calib_ctx=calib_ctx, prune=prune, device=device, force=force, progress=progress,
                           trust_pickle=trust_pickle, threads=threads)
    if str(format).lower() != "gguf":
        raise OptionError(f"--format {format!r} is not supported; choose gguf or onnx")
    if device is not None:
        raise OptionError("--device chooses the ONNX MatMulNBits compute type; a GGUF file is the same for every "
                          "device: drop --device (or give --format onnx)")
    # ---- end ONNX export ----
    if output is None:
        raise OptionError("an output path is needed (-o OUT.gguf)")
    output = Path(output)
    if quant is not None and outtype is not None:
        raise OptionError("give either --outtype (one type) or --quant (a recipe), not both")
    if target_bpw is not None and outtype is not None:
        raise OptionError("--target-bpw chooses the types itself; drop --outtype")
    if target_bpw is not None and not 1.0 < target_bpw <= 32.0:
        raise OptionError(f"--target-bpw {target_bpw} is outside (1, 32]")
    if target_types is not None:
        from edgeai.converters.pipeline import target_types as checked_types

        target_types = checked_types(target_types, target_bpw)
    if parse_method(method) is Method.GPTQ and target_bpw is not None:  # GPTQ has no IQ4 (see _convert_plan)
        from edgeai.quant.allocate import DEFAULT_CANDIDATES

        if target_types is not None and any(t in GRIDLESS for t in target_types):
            raise OptionError(f"--method gptq does not write {', '.join(t for t in target_types if t in GRIDLESS)}; "
                              "leave them out of --target-types")
        target_types = target_types or tuple(t for t in DEFAULT_CANDIDATES if t not in GRIDLESS)
    if quant is not None:
        recipe = get_recipe(quant)
    elif outtype is not None:
        recipe = get_recipe(parse_outtype(outtype).value)
    else:
        from edgeai.converters.plan import default_recipe

        recipe = get_recipe(default_recipe(src))
        if recipe.name != OutType.F16.value:
            log.info("the checkpoint ships MXFP4 experts: writing them as shipped, the rest Q8_0 (recipe %s); "
                     "--outtype or --quant chooses otherwise", recipe.name)
    method = parse_method(method)
    from edgeai.quant.prune import parse_prune

    prune_steps = parse_prune(prune)
    calib_text = calibration_text(calib, method, prune_steps, also_needed_by="--draft-of" if target else None)
    if output.exists() and not force:  # fail before any reading
        raise OutputError(f"{output} exists; pass --force (force=True) to overwrite it")
    check_not_source(output, Path(src) if src is not None else default_model_path())
    plan = open_plan(src, recipe, trust_pickle=trust_pickle)
    try:
        if target is not None:
            from edgeai.converters.draft import draft_step

            prune_steps = (*prune_steps, draft_step(plan, target, draft_layers))
        prepared = prepare(plan, recipe, method, calib=calib, calib_text=calib_text, calib_ctx=calib_ctx,
                           prune_steps=prune_steps, target_bpw=target_bpw, target_types=target_types, threads=threads)
        return _write(plan, output, recipe, method, force, progress, threads, prepared.importance, prepared.encoded)
    finally:
        plan.close()


def _draft_target(draft_of, draft_layers, format: str, prune, calib):
    """The --draft-of target's header (None without --draft-of), the options that go with it checked
    before any reading: OptionError naming the option."""
    if draft_of is None:
        if draft_layers is not None:
            raise OptionError("--draft-layers sets how many blocks a draft keeps: give --draft-of TARGET.gguf too")
        return None
    if str(format).lower() != "gguf":
        raise OptionError(f"--draft-of makes a GGUF draft for the native engine's speculative decoding; drop --format {format}")
    from edgeai.quant.prune import PruneKind, parse_prune

    if any(s.kind is PruneKind.LAYERS for s in parse_prune(prune)):
        raise OptionError("--draft-of drops blocks itself: set how many it keeps with --draft-layers N, not --prune layers:K")
    if calib is None:
        raise OptionError("--draft-of chooses the blocks to drop on calibration text: pass --calib FILE (text like "
                          "what the model will be asked)")
    if draft_layers is not None:
        from edgeai.options import checked_int

        checked_int("draft_layers (--draft-layers)", draft_layers, minimum=1, why="blocks the draft keeps")
    from edgeai.converters.draft import read_target

    return read_target(draft_of)


def _log_shipped(plan: ConversionPlan) -> None:
    """Say whether the tensors the checkpoint ships encoded are copied, or decoded and encoded again."""
    shipped = [t for t in plan.tensors if t.shipped is not None]
    copied = [t for t in shipped if t.shipped_bytes() is not None]
    again = [t for t in shipped if t.shipped_bytes() is None]
    if copied:
        log.info("%d tensor(s) copied as the checkpoint ships them (%s)", len(copied), copied[0].shipped.fmt.name)
    if again:
        types = sorted({t.fmt.name for t in again})
        log.info("%d tensor(s) the checkpoint ships in %s are decoded to float32 and encoded again as %s "
                 "(e.g. %s; a type other than the shipped one, or values changed by pruning or AWQ)",
                 len(again), again[0].shipped.fmt.name, ", ".join(types), again[0].name)


def _write(plan: ConversionPlan, output: Path, recipe: Recipe, method: Method, force: bool, progress: Progress | None,
           threads: int, importance: ImportanceLookup | None = None,
           encoded: dict[str, list[np.ndarray]] | None = None) -> Path:
    recipe_meta = {
        "tool": "edgeai",
        "version": __version__,
        "recipe": recipe.name,
        "method": method.value,
        "source": plan.source_files[0].parent.name if plan.source_format != "gguf" else plan.source_files[0].name,
        "source_format": plan.source_format,
        "tensor_types": {t.name: t.fmt.name for t in plan.tensors},
        "fallbacks": {t.name: t.fallback for t in plan.tensors if t.fallback},
        **plan.extra_recipe,
    }
    placeholder = ",".join(f"{f.name}:{_SHA_PLACEHOLDER}" for f in plan.source_files)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, atomic_output(output, force=force) as tmp:
        checksum = pool.submit(_sha256_files, plan.source_files)  # overlaps with the conversion
        with open(tmp, "wb+") as fh:
            writer = GGUFWriter(fh)
            writer.add("general.architecture", plan.arch)
            for meta in plan.kv:
                if meta.key == "general.architecture":
                    continue
                writer.add(meta.key, meta.value, meta.vtype, meta.sub_type)
            if not any(m.key == "general.name" for m in plan.kv):
                writer.add("general.name", plan.name)
            writer.add("general.file_type", int(_file_type(recipe, "target_bpw" in plan.extra_recipe)), GGUFValueType.UINT32)
            writer.add("general.quantization_version", 2, GGUFValueType.UINT32)
            writer.add("edgeai.version", __version__)
            writer.add("edgeai.recipe", json.dumps(recipe_meta, sort_keys=True))
            writer.add("edgeai.source.sha256", placeholder)
            for t in plan.tensors:
                writer.add_tensor(t.name, t.shape, t.fmt.ggml_type, t.nbytes)
            writer.write_header()
            _log_shipped(plan)
            total, done, what = sum(t.nbytes for t in plan.tensors), 0, f"converting to {output.name}"
            if progress:
                progress(0, total, what)
            for t in plan.tensors:
                if encoded is not None and t.name in encoded:  # already quantized (GPTQ)
                    chunks = encoded.pop(t.name)
                elif (shipped := t.shipped_bytes()) is not None:  # the checkpoint's own bytes
                    chunks = shipped()
                else:
                    chunks = (
                        quantize(c, t.fmt, n_threads=threads, fit=Fit.SEARCH,
                                 importance=importance(t.name, i) if importance else None)
                        for i, c in enumerate(t.chunks())
                    )
                writer.write_tensor_chunks(t.name, chunks)
                done += t.nbytes
                if progress:
                    progress(done, total, what)
            writer.patch_string("edgeai.source.sha256", checksum.result())
            writer.finish()
    log.info("wrote %s: %d tensors, %.1f MiB", output, len(plan.tensors), output.stat().st_size / 2**20)
    return output
