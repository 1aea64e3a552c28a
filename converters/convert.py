"""The converter: a checkpoint (Hugging Face folder or GGUF) -> a GGUF file.

    source (lazy) -> plan (metadata + every output tensor, sizes known) -> header -> data, streamed

The output appears only when complete: it is written to a temporary file beside OUT, fsynced and
renamed (see `edgeai.paths.atomic_output`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import numpy as np
from gguf import GGUFValueType, LlamaFileType

import edgeai
from edgeai.converters.gguf_writer import GGUFWriter
from edgeai.converters.sources import GGUFSource, PickleCheckpoint, SafetensorsCheckpoint, TensorSource
from edgeai.converters.specs import ArchSpec, HParams, hparams_from_gguf, spec_for, spec_for_gguf
from edgeai.converters.tokenizer import MetaKV, tokenizer_kv
from edgeai.errors import CheckpointError, OptionError, OutputError, TensorError, UnsupportedArchitectureError
from edgeai.paths import atomic_output, check_not_source, default_model_path
from edgeai.quant.formats import QuantFormat, quantize
from edgeai.quant.formats import Fit
from edgeai.quant.recipes import Method, OutType, Recipe, get_recipe, parse_method, parse_outtype, tensor_type, validate

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


@dataclass
class OutputTensor:
    """One tensor of the output file: where its float32 data comes from and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # numpy order
    fmt: QuantFormat
    chunks: Callable[[], Iterator[np.ndarray]]  # float32 pieces in file order (one per expert when stacked)
    fallback: str = ""  # why the recipe's type was replaced (rows that do not fill its blocks), if it was

    @property
    def nbytes(self) -> int:
        return self.fmt.nbytes(int(np.prod(self.shape, dtype=np.int64)))


@dataclass
class ConversionPlan:
    """Everything the writer needs, known before any tensor data is read."""

    arch: str
    name: str
    kv: list[MetaKV]
    tensors: list[OutputTensor]
    source_files: list[Path]
    source: TensorSource
    source_format: str
    spec: ArchSpec | None  # None for a GGUF of an architecture edgeai has no spec for
    hparams: HParams | None
    extra_recipe: dict = field(default_factory=dict)

    def tensor(self, name: str) -> OutputTensor:
        for t in self.tensors:  # a few hundred entries, looked up once per tensor read
            if t.name == name:
                return t
        raise KeyError(name)

    def read(self, name: str) -> np.ndarray:
        """The whole float32 tensor `name` (GGUF name and layout, numpy order), experts stacked."""
        t = self.tensor(name)
        out = np.empty(t.shape, dtype=np.float32)
        flat = out.reshape(-1)
        offset = 0
        for chunk in t.chunks():  # run the generator to the end: it releases each source's pages
            flat[offset:offset + chunk.size] = chunk.reshape(-1)
            offset += chunk.size
        assert offset == flat.size, f"{name}: read {offset} of {flat.size} values"
        return out

    def close(self) -> None:
        self.source.close()


def _checked(name: str, data: np.ndarray) -> np.ndarray:
    """`data`, after checking it holds no NaN/Inf (slice by slice: no tensor-sized mask)."""
    flat = data.reshape(-1)
    step = 1 << 22
    for start in range(0, flat.size, step):
        finite = np.isfinite(flat[start:start + step])
        if not finite.all():
            bad = int(np.count_nonzero(~np.isfinite(flat)))
            raise TensorError(f"tensor {name!r} contains {bad} NaN/Inf value(s); the checkpoint is damaged")
    return data


def _reader(source: TensorSource, names: tuple[str, ...], transform) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        for name in names:
            data = source.read(name)
            if transform is not None:
                data = transform(data)
            yield _checked(name, np.ascontiguousarray(data, dtype=np.float32))
            source.release(name)

    return chunks


def _plan_hf(folder: Path, recipe: Recipe, trust_pickle: bool) -> ConversionPlan:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; a Hugging Face checkpoint folder needs one")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    spec = spec_for(config.get("architectures"), str(config_path))
    hp = spec.hparams(config, str(config_path))

    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(folder.glob("*.bin"))
    if safetensors or (folder / SafetensorsCheckpoint.INDEX).is_file():
        source: TensorSource = SafetensorsCheckpoint(folder)
        source_files, source_format = safetensors, "safetensors"
    elif pickles:
        if not trust_pickle:
            raise CheckpointError(
                f"{folder} holds a PyTorch pickle checkpoint ({pickles[0].name}); unpickling can run code. "
                "Pass --trust-pickle to load it with torch.load(weights_only=True), or convert it to safetensors"
            )
        source, source_files, source_format = PickleCheckpoint(folder), pickles, "pytorch"
    else:
        raise CheckpointError(f"{folder} has config.json but no weights (*.safetensors or *.bin)")

    try:
        infos = source.infos()
        _check_counts(config_path, config, hp, infos)  # before planning: the plan's size follows these counts
        planned = spec.plan(hp)
        missing = [s for p in planned for s in p.sources if s not in infos]
        if missing:
            raise TensorError(
                f"{folder}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                f"a {spec.family} checkpoint with this config.json needs it"
            )
        unexpected = sorted(set(infos) - spec.used_sources(planned, set(infos)))
        if unexpected:
            raise TensorError(
                f"{folder}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) that a {spec.family} "
                "model with this config.json does not have; the config and the weights do not match"
            )
        for p in planned:
            for s in p.sources:
                if tuple(infos[s].shape) != p.expected_source_shape():
                    raise TensorError(
                        f"{folder}: tensor {s!r} has shape {list(infos[s].shape)}, expected "
                        f"{list(p.expected_source_shape())} from config.json"
                    )
        tensors = []
        has_output = any(p.name == "output.weight" for p in planned)
        for p in planned:
            choice = tensor_type(p.name, p.shape, recipe, n_blocks=hp.n_layer, has_experts=hp.n_expert > 0,
                                 has_output=has_output)
            if p.generated is not None:
                gen = p.generated
                chunks = lambda gen=gen: iter((gen(),))  # noqa: E731
            else:
                chunks = _reader(source, p.sources, p.transform)
            tensors.append(OutputTensor(p.name, p.shape, choice.fmt, chunks, choice.fallback))
        arch = spec.gguf_arch
        kv = [MetaKV(f"{arch}.{k}", v) for k, v in spec.gguf_kv(hp).items()]
        kv += tokenizer_kv(folder, hp.n_vocab, config)
    except BaseException:
        source.close()
        raise
    name = str(config.get("_name_or_path") or folder.name)
    return ConversionPlan(arch, name, kv, tensors, source_files, source, source_format, spec, hp)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _check_counts(config_path: Path, config: Mapping[str, object], hp: HParams, infos: Mapping[str, object]) -> None:
    """config.json's layer and expert counts against the tensors present; a mismatch is a TensorError
    naming the key, its value and what the tensors hold."""
    layers = {int(m.group(1)) for name in infos if (m := _LAYER.match(name))}
    held = max(layers) + 1 if layers else 0
    if hp.n_layer != held:
        raise TensorError(f"{config_path}: num_hidden_layers is {hp.n_layer}, but the tensors hold {held} layer(s) "
                          f"(model.layers.0 .. model.layers.{held - 1}); the config and the weights do not match")
    if hp.n_expert:
        experts = {int(m.group(1)) for name in infos if (m := _EXPERT.search(name))}
        held = max(experts) + 1 if experts else 0
        if hp.n_expert != held:
            key = next(k for k in ("num_local_experts", "num_experts") if config.get(k) is not None)
            raise TensorError(f"{config_path}: {key} is {hp.n_expert}, but the tensors hold {held} expert(s) "
                              "per layer; the config and the weights do not match")


# Keys a re-encode must not copy: they describe the old file's encoding or its recipe.
_NOT_COPIED = ("general.file_type", "general.quantization_version", "general.alignment")


def _plan_gguf(path: Path, recipe: Recipe) -> ConversionPlan:
    source = GGUFSource(path)
    try:
        meta = source.metadata()
        arch = str(meta.get("general.architecture", ""))
        if not arch:
            raise CheckpointError(f"{path} has no general.architecture; it is not a model GGUF")
        kv = []
        for key, value in meta.items():
            if key in _NOT_COPIED or key.startswith("edgeai."):
                continue
            vtype, sub = source.value_type(key)
            kv.append(MetaKV(key, value, vtype, sub if vtype == GGUFValueType.ARRAY else None))
        tensors = []
        infos = source.infos()
        n_blocks = int(meta.get(f"{arch}.block_count", 0) or 0)
        has_experts = int(meta.get(f"{arch}.expert_count", 0) or 0) > 0
        for name, info in infos.items():
            choice = tensor_type(name, info.shape, recipe, n_blocks=n_blocks, has_experts=has_experts,
                                 has_output="output.weight" in infos)
            tensors.append(OutputTensor(name, info.shape, choice.fmt, _reader(source, (name,), None), choice.fallback))
        try:
            spec = spec_for_gguf(meta, str(path))
        except UnsupportedArchitectureError:  # re-encoding works for any architecture; calibration needs a spec
            spec, hp = None, None
        else:  # a known architecture: its hyper-parameters must hold (no zero head count, ...)
            hp = hparams_from_gguf(meta, spec, str(path))
    except BaseException:
        source.close()
        raise
    name = str(meta.get("general.name", path.stem))
    return ConversionPlan(arch, name, kv, tensors, [path], source, "gguf", spec, hp)


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


def _progress(quiet: bool | None):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    disable = quiet if quiet is not None else not console.is_terminal
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, disable=disable, transient=False,
    )


def open_plan(src: str | Path | None, recipe: str | Recipe | OutType = OutType.F16, *,
              trust_pickle: bool = False) -> ConversionPlan:
    """Read a checkpoint's headers and plan its conversion under `recipe` (a preset name, a Recipe,
    or an OutType); no tensor data is read yet.

    The caller closes the plan (`plan.close()`). `plan.read(name)` gives any output tensor as float32,
    which calibration uses to run the model before quantizing it.
    """
    recipe = get_recipe(recipe.value if isinstance(recipe, OutType) else recipe)
    validate(recipe)
    src_path = Path(src) if src is not None else default_model_path()
    if not src_path.exists():
        raise CheckpointError(f"{src_path} does not exist; give a Hugging Face folder or a .gguf file")
    if src_path.is_dir():
        return _plan_hf(src_path, recipe, trust_pickle)
    if src_path.suffix.lower() == ".gguf":
        return _plan_gguf(src_path, recipe)
    raise CheckpointError(
        f"{src_path} is neither a Hugging Face checkpoint folder nor a .gguf file; "
        "point at the folder that holds config.json"
    )


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
    quiet: bool | None = None,
    trust_pickle: bool = False,
    threads: int = 0,
    format: str = "gguf",
    block_size: int = 32,
    device: str | None = None,
) -> Path:
    """Convert a checkpoint to a GGUF file that llama.cpp and edgeai's runtime load, or (format="onnx")
    to an ONNX folder that onnxruntime runs (`edgeai.converters.onnx_export.export_onnx`).

    Args:
        src: a Hugging Face folder (config.json, safetensors, tokenizer files) or a GGUF file;
            None means the bundled default model.
        output: the GGUF file to write. It appears only once complete.
        outtype: one element type for every weight matrix: f32, f16 (default), bf16 or q8_0.
        quant: a quantization recipe instead (see `edgeai.quant.recipes.RECIPES`: q4_0, q4_k_m, ...).
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
        quiet: hide the progress bar; None shows it only on a terminal.
        trust_pickle: allow PyTorch `.bin` checkpoints (loaded with weights_only=True).
        threads: threads for quantization; 0 uses every core.
        format: "gguf" (a file) or "onnx" (a folder; `quant` is then fp32, fp16, int8 or int4).
        block_size: weights per scale of ONNX int8/int4 weights (32, 64 or 128).
        device: ONNX only: the device profile whose CPU sets MatMulNBits' accuracy_level (None:
            this machine; `edgeai.converters.onnx_export.accuracy_level_for`).

    Returns:
        The path written.
    """
    threads, calib_ctx = checked_knobs(threads, calib_ctx)
    # ---- ONNX export (edgeai.converters.onnx_export) ----
    if str(format).lower() == "onnx":
        if outtype is not None or target_bpw is not None or target_types is not None:
            raise OptionError("--format onnx takes --quant fp32|fp16|int8|int4; drop --outtype / --target-bpw / --target-types")
        from edgeai.converters.onnx_export import export_onnx

        return export_onnx(src, output, quant=quant or "fp32", block_size=block_size, method=method, calib=calib,
                           calib_ctx=calib_ctx, prune=prune, device=device, force=force, quiet=quiet,
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
        target_types = _target_types(target_types, target_bpw)
    if parse_method(method) is Method.GPTQ and target_bpw is not None:  # GPTQ has no IQ4 (see _convert_plan)
        from edgeai.quant.allocate import DEFAULT_CANDIDATES

        if target_types is not None and any(t in _GRIDLESS for t in target_types):
            raise OptionError(f"--method gptq does not write {', '.join(t for t in target_types if t in _GRIDLESS)}; "
                              "leave them out of --target-types")
        target_types = target_types or tuple(t for t in DEFAULT_CANDIDATES if t not in _GRIDLESS)
    recipe = get_recipe(quant) if quant is not None else get_recipe(parse_outtype(outtype or OutType.F16).value)
    method = parse_method(method)
    from edgeai.quant.prune import parse_prune

    prune_steps = parse_prune(prune)
    calib_text = _calibration_text(calib, method, prune_steps)
    if output.exists() and not force:  # fail before any reading
        raise OutputError(f"{output} exists; pass --force (force=True) to overwrite it")
    check_not_source(output, Path(src) if src is not None else default_model_path())
    plan = open_plan(src, recipe, trust_pickle=trust_pickle)
    try:
        if prune_steps:  # before calibration for quantization: that sees the pruned model
            _prune(plan, recipe, prune_steps, calib_text, calib_ctx, calib)
        return _convert_plan(plan, output, recipe, method, calib, calib_text, calib_ctx, target_bpw, target_types, force,
                             quiet, threads)
    finally:
        plan.close()


def _convert_plan(plan: ConversionPlan, output: Path, recipe: Recipe, method: Method, calib: str | Path | None,
                  calib_text: str | None, calib_ctx: int, target_bpw: float | None, target_types: Sequence[str] | None,
                  force: bool, quiet: bool | None, threads: int) -> Path:
    from threadpoolctl import threadpool_limits

    # numpy's BLAS (the calibration forward pass, GPTQ, AWQ) gets the threads asked for: its default,
    # one thread per core, spin-waits and runs small products many times slower on a busy machine
    with threadpool_limits(limits=threads if threads > 0 else None, user_api="blas"):
        importance, encoded = None, None
        if method is Method.IMATRIX and target_bpw is None and not _uses_importance(plan):
            # every type ignores importance (e.g. q8_0): calibrating would change no byte
            log.info("--method %s: no tensor type of this recipe uses calibration data; skipping it", method.value)
            plan.extra_recipe["calibration"] = {"skipped": "no tensor type of the recipe uses it",
                                                "file": Path(calib).name}
        elif method is Method.IMATRIX or (method.needs_calibration and target_bpw is not None):
            from edgeai.quant.calibrate import collect_statistics

            stats = collect_statistics(plan, calib_text, n_ctx=calib_ctx)
            plan.extra_recipe["calibration"] = {**stats.recipe(), "file": Path(calib).name}
            importance = _importance_lookup({name: stats.importance(name) for name in stats.columns})
        if target_bpw is not None:
            _allocate(plan, target_bpw, importance, target_types)
        if method is Method.GPTQ:
            gridless = sorted({t.fmt.name for t in plan.tensors if t.fmt.name in _GRIDLESS})
            if gridless:  # GPTQ rounds each column on a uniform grid; IQ4's is not
                raise OptionError(f"--method gptq does not write {', '.join(gridless)}; use --method imatrix or awq "
                                  "for them, or a recipe (or --target-types) without IQ4 types")
            encoded = _gptq(plan, calib_text, calib_ctx, Path(calib).name, threads)
        if method is Method.AWQ:
            importance = _awq(plan, calib_text, calib_ctx, Path(calib).name, threads)
        if method not in (Method.IMATRIX, Method.AWQ):
            importance = None  # statistics gathered only to size the mix
        return _write(plan, output, recipe, method, force, quiet, threads, importance, encoded)


# Types whose grid GPTQ's column-by-column rounding cannot use (non-uniform).
_GRIDLESS = ("iq4_nl", "iq4_xs")


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


def _calibration_text(calib: str | Path | None, method: Method, prune_steps: Sequence[PruneSpec] = ()) -> str | None:
    pruning = next((s for s in prune_steps if s.needs_calibration), None)
    needed_by = f"--method {method.value}" if method.needs_calibration else f"--prune {pruning}" if pruning else None
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


def _prune(plan: ConversionPlan, recipe: Recipe, steps: Sequence[PruneSpec], text: str | None, n_ctx: int,
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


def _target_types(names: Sequence[str], target_bpw: float | None) -> tuple[str, ...]:
    """The --target-types names, checked: known block types, and only with --target-bpw."""
    from edgeai.quant.formats import format_by_name

    if target_bpw is None:
        raise OptionError("--target-types only narrows what --target-bpw chooses from; give --target-bpw too")
    types = tuple(format_by_name(n.strip()).name for n in names if n.strip())
    not_blocks = [t for t in types if format_by_name(t).block_size == 1]
    if not types or not_blocks:
        raise OptionError(f"--target-types needs block types such as q4_0,q4_k,q6_k,q8_0; got {', '.join(names)}")
    return types


def _allocate(plan: ConversionPlan, target_bpw: float, importance: ImportanceLookup | None,
              types: Sequence[str] | None = None) -> None:
    """Re-type the plan's weight matrices for the size target (see edgeai.quant.allocate)."""
    from edgeai.quant.allocate import DEFAULT_CANDIDATES, allocate
    from edgeai.quant.formats import FORMATS

    result = allocate(plan, target_bpw, importance=importance, candidates=types or DEFAULT_CANDIDATES)
    for t in plan.tensors:
        t.fmt = FORMATS[result.types[t.name]]
        t.fallback = ""
    plan.extra_recipe["target_bpw"] = target_bpw
    if types:
        plan.extra_recipe["target_types"] = list(types)
    plan.extra_recipe["bits_per_weight"] = round(result.bits_per_weight, 4)


def _gptq(plan: ConversionPlan, text: str, n_ctx: int, calib_name: str, threads: int) -> dict[str, list[np.ndarray]]:
    """Run GPTQ over the calibration text; returns the encoded bytes of every block-format matrix."""
    from edgeai.quant.calibrate import calibration_set
    from edgeai.quant.gptq import gptq_model

    calib = calibration_set(plan, text, n_ctx=n_ctx)
    plan.extra_recipe["calibration"] = {**calib.recipe(), "file": calib_name}
    return gptq_model(plan, calib.chunks, n_threads=threads, progress=lambda what: log.info("GPTQ: %s", what))


def _awq(plan: ConversionPlan, text: str, n_ctx: int, calib_name: str, threads: int) -> ImportanceLookup:
    """Search AWQ scales on the calibration text and fold them into the plan's tensors; returns the
    importance of the scaled inputs for the writer's search."""
    from edgeai.quant.awq import awq_model
    from edgeai.quant.calibrate import calibration_set

    calib = calibration_set(plan, text, n_ctx=n_ctx)
    plan.extra_recipe["calibration"] = {**calib.recipe(), "file": calib_name}
    result = awq_model(plan, calib.chunks, n_threads=threads, progress=lambda what: log.info("AWQ: %s", what))
    result.apply(plan)
    plan.extra_recipe["awq"] = result.recipe()
    return _importance_lookup(result.importance)


def _uses_importance(plan: ConversionPlan) -> bool:
    """Whether any tensor is written in a type whose encoder weighs its error by importance."""
    from edgeai.quant.formats import takes_importance

    return any(takes_importance(t.fmt) for t in plan.tensors)


ImportanceLookup = Callable[[str, int], "np.ndarray | None"]


def _importance_lookup(importance: Mapping[str, np.ndarray]) -> ImportanceLookup:
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


def _write(plan: ConversionPlan, output: Path, recipe: Recipe, method: Method, force: bool, quiet: bool | None,
           threads: int, importance: ImportanceLookup | None = None,
           encoded: dict[str, list[np.ndarray]] | None = None) -> Path:
    recipe_meta = {
        "tool": "edgeai",
        "version": edgeai.__version__,
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
            writer.add("edgeai.version", edgeai.__version__)
            writer.add("edgeai.recipe", json.dumps(recipe_meta, sort_keys=True))
            writer.add("edgeai.source.sha256", placeholder)
            for t in plan.tensors:
                writer.add_tensor(t.name, t.shape, t.fmt.ggml_type, t.nbytes)
            writer.write_header()
            total = sum(t.nbytes for t in plan.tensors)
            with _progress(quiet) as progress:
                task = progress.add_task(f"converting to {output.name}", total=total)
                for t in plan.tensors:
                    if encoded is not None and t.name in encoded:  # already quantized (GPTQ)
                        chunks = encoded.pop(t.name)
                    else:
                        chunks = (
                            quantize(c, t.fmt, n_threads=threads, fit=Fit.SEARCH,
                                     importance=importance(t.name, i) if importance else None)
                            for i, c in enumerate(t.chunks())
                        )
                    writer.write_tensor_chunks(t.name, chunks)
                    progress.advance(task, t.nbytes)
            writer.patch_string("edgeai.source.sha256", checksum.result())
            writer.finish()
    log.info("wrote %s: %d tensors, %.1f MiB", output, len(plan.tensors), output.stat().st_size / 2**20)
    return output
