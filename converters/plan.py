"""Conversion plans: a checkpoint's headers read and its output planned, before any tensor data.

    source (lazy: `converters.sources`) -> ConversionPlan (metadata + every output tensor, sizes known)

A plan is what every later step takes: the calibration methods and pruning (`converters.pipeline`,
`quant/`), and the writers (`converters.convert` for GGUF, `converters.onnx_export` for ONNX). It
is the one conversion type lower layers may name; nothing here imports a writer.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
from gguf import GGUFValueType

from edgeai.architectures import ArchSpec, HParams, PlannedTensor, hparams_from_gguf, spec_for, spec_for_gguf
from edgeai.converters.sources import (GGUFSource, MXFP4Pairs, PickleCheckpoint, SafetensorsCheckpoint, TensorInfo,
                                      TensorSource)
from edgeai.converters.tokenizer import MetaKV, tokenizer_kv
from edgeai.errors import CheckpointError, TensorError, UnsupportedArchitectureError
from edgeai.paths import default_model_path
from edgeai.quant.formats import FORMATS, QuantFormat
from edgeai.quant.recipes import OutType, Recipe, get_recipe, tensor_type, validate

log = logging.getLogger(__name__)


@dataclass
class OutputTensor:
    """One tensor of the output file: where its float32 data comes from and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # numpy order
    fmt: QuantFormat
    chunks: Callable[[], Iterator[np.ndarray]]  # float32 pieces in file order (one per expert when stacked)
    fallback: str = ""  # why the recipe's type was replaced (rows that do not fill its blocks), if it was
    shipped: Shipped | None = None  # the checkpoint's own encoding of these values, where it has one

    @property
    def nbytes(self) -> int:
        return self.fmt.nbytes(int(np.prod(self.shape, dtype=np.int64)))

    def shipped_bytes(self) -> Callable[[], Iterator[np.ndarray]] | None:
        """The checkpoint's encoded bytes when they are what this tensor writes: its type is the shipped
        one and no step (pruning, AWQ) has changed its values since planning; else None."""
        s = self.shipped
        return s.raw if s is not None and s.fmt is self.fmt and s.chunks is self.chunks else None


@dataclass(frozen=True)
class Shipped:
    """Values a checkpoint ships already encoded (gpt-oss's MXFP4 experts): their bytes in `fmt`, and
    the `chunks` (float32 decode) of the OutputTensor they were planned with."""

    fmt: QuantFormat
    raw: Callable[[], Iterator[np.ndarray]]  # uint8 pieces in file order
    chunks: Callable[[], Iterator[np.ndarray]]


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


def tensor_reader(source: TensorSource, names: tuple[str, ...], transform) -> Callable[[], Iterator[np.ndarray]]:
    """An OutputTensor's `chunks`: each source tensor read, transformed, checked finite, then released."""
    def chunks() -> Iterator[np.ndarray]:
        for name in names:
            data = source.read(name)
            if transform is not None:
                data = transform(data)
            yield _checked(name, np.ascontiguousarray(data, dtype=np.float32))
            source.release(name)

    return chunks


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; a Hugging Face checkpoint folder needs one")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} holds a JSON {type(config).__name__}, not an object of settings")
    return config


# quantization_config.quant_method values whose encoded tensors edgeai reads (mxfp4: sources.MXFP4Pairs)
SHIPPED_QUANT_METHODS = ("mxfp4",)


def _shipped_quant_method(config: Mapping[str, object], config_path: Path) -> str | None:
    """config.json's quantization_config.quant_method: None, or one of SHIPPED_QUANT_METHODS."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in SHIPPED_QUANT_METHODS:
        raise CheckpointError(f"{config_path}: quantization_config.quant_method is {method!r}; edgeai reads checkpoints "
                              f"in float32, float16, bfloat16 or {', '.join(SHIPPED_QUANT_METHODS)}: dequantize this one "
                              "first (e.g. save it again from transformers with dequantize=True)")
    return method


def default_recipe(src: str | Path | None) -> str:
    """The recipe when none is asked for: `mxfp4_moe` for a checkpoint that ships MXFP4 experts (they
    stay as shipped, the rest Q8_0), f16 for any other."""
    folder = Path(src) if src is not None else default_model_path()
    if folder.is_dir() and (folder / "config.json").is_file() and \
            _shipped_quant_method(_read_config(folder), folder / "config.json") == "mxfp4":
        return "mxfp4_moe"
    return OutType.F16.value


def _plan_hf(folder: Path, recipe: Recipe, trust_pickle: bool) -> ConversionPlan:
    config_path = folder / "config.json"
    config = _read_config(folder)
    shipped_quant = _shipped_quant_method(config, config_path)
    spec = spec_for(config.get("architectures"), str(config_path))
    hp = spec.hparams(config, str(config_path))

    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(folder.glob("*.bin"))
    if safetensors or (folder / SafetensorsCheckpoint.INDEX).is_file():
        source: TensorSource = SafetensorsCheckpoint(folder)
        if shipped_quant == "mxfp4":
            source = MXFP4Pairs(source)
        source_files, source_format = safetensors, "safetensors"
    elif pickles:
        if shipped_quant is not None:
            raise CheckpointError(f"{config_path} says the weights are {shipped_quant}-encoded, which edgeai reads from "
                                  "safetensors only; this folder holds a PyTorch pickle checkpoint")
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
            hint = ""
            if missing[0] + "_blocks" in infos:
                hint = (f"; the checkpoint ships it as MXFP4 ({missing[0]}_blocks/_scales), but config.json has no "
                        "quantization_config with quant_method \"mxfp4\": restore it from the original checkpoint")
            raise TensorError(
                f"{folder}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                f"a {spec.family} checkpoint with this config.json needs it{hint}"
            )
        unexpected = sorted(set(infos) - spec.used_sources(planned, set(infos)))
        if unexpected:
            raise TensorError(
                f"{folder}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) that a {spec.family} "
                "model with this config.json does not have; the config and the weights do not match"
            )
        for p in planned:
            for s in p.sources:
                if infos[s].dtype == "U8":  # bytes that are no MXFP4 pair's (those read as dtype MXFP4)
                    raise TensorError(f"{folder}: tensor {s!r} is U8, which edgeai reads only as MXFP4 _blocks/_scales "
                                      "pairs; save the checkpoint in float32, float16 or bfloat16")
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
                chunks = tensor_reader(source, p.sources, p.transform)
            tensors.append(OutputTensor(p.name, p.shape, choice.fmt, chunks, choice.fallback,
                                        _shipped(source, p, infos, chunks)))
        arch = spec.gguf_arch
        kv = [MetaKV(f"{arch}.{k}", v) for k, v in spec.gguf_kv(hp).items()]
        kv += tokenizer_kv(folder, hp.n_vocab, config)
    except BaseException:
        source.close()
        raise
    name = str(config.get("_name_or_path") or folder.name)
    return ConversionPlan(arch, name, kv, tensors, source_files, source, source_format, spec, hp)


def _shipped(source: TensorSource, p: PlannedTensor, infos: Mapping[str, TensorInfo],
             chunks: Callable[[], Iterator[np.ndarray]]) -> Shipped | None:
    """The shipped MXFP4 bytes of planned tensor `p`, when its one source is an MXFP4 pair and the
    spec says which of its rows it takes."""
    if len(p.sources) != 1 or infos[p.sources[0]].dtype != MXFP4Pairs.DTYPE:
        return None
    if p.block_rows is None:  # a spec with no block layout for this tensor: it is decoded and re-encoded
        return None
    assert isinstance(source, MXFP4Pairs)
    name, rows = p.sources[0], p.block_rows

    def raw() -> Iterator[np.ndarray]:
        for blocks in source.read_mxfp4(name, rows):
            yield blocks.reshape(-1)
        source.release(name)

    return Shipped(FORMATS["mxfp4"], raw, chunks)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up|down)_proj")  # gpt-oss: all experts in one tensor


def _check_counts(config_path: Path, config: Mapping[str, object], hp: HParams, infos: Mapping[str, object]) -> None:
    """config.json's layer and expert counts against the tensors present; a mismatch is a TensorError
    naming the key, its value and what the tensors hold."""
    layers = {int(m.group(1)) for name in infos if (m := _LAYER.match(name))}
    held = max(layers) + 1 if layers else 0
    if hp.n_layer != held:
        raise TensorError(f"{config_path}: num_hidden_layers is {hp.n_layer}, but the tensors hold {held} layer(s) "
                          f"(model.layers.0 .. model.layers.{held - 1}); the config and the weights do not match")
    if hp.n_expert and not any(_FUSED_EXPERTS.search(name) for name in infos):  # fused: their shapes are checked
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
            tensors.append(OutputTensor(name, info.shape, choice.fmt, tensor_reader(source, (name,), None), choice.fallback))
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
