"""Tensor sources: read a checkpoint lazily, one tensor at a time.

A source knows every tensor's name, shape and dtype from the file headers alone; `read` maps
one tensor's bytes (mmap) and returns it as float32. Peak memory is therefore about the largest
tensor, whatever the checkpoint's size. Every file is validated before its data is touched:
a truncated or corrupt file raises CheckpointError naming the file and tensor.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from edgeai.errors import CheckpointError, TensorError, TokenizerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """What the headers say about one tensor: name, numpy-order shape, source dtype, size."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


class TensorSource(Protocol):
    """A checkpoint's tensors, readable one at a time."""

    path: Path

    def infos(self) -> dict[str, TensorInfo]: ...

    def read(self, name: str) -> np.ndarray:
        """The tensor as a float32 array in numpy order ([out, in] for a linear weight). It may be a
        read-only view of the file: copy it before writing into it."""
        ...

    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages from this process (they stay in the page cache)."""
        ...

    def close(self) -> None: ...


# safetensors dtype -> (numpy dtype of the stored bits, decoder to float32)
def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


_SAFETENSORS_DTYPES: dict[str, tuple[np.dtype, object]] = {
    "F32": (np.dtype("<f4"), None),
    "F16": (np.dtype("<f2"), None),
    "F64": (np.dtype("<f8"), None),
    "BF16": (np.dtype("<u2"), _bf16_to_f32),
}
# dtypes held only as bytes of an encoded tensor (MXFP4 blocks and scales: `MXFP4Pairs`), never as values
_STORED_DTYPES: dict[str, np.dtype] = {"U8": np.dtype("u1")}


class SafetensorsFile:
    """One .safetensors file: header parsed and checked up front, data mapped read-only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} does not exist") from None
        size = self.path.stat().st_size
        try:
            if size < 8:
                raise CheckpointError(f"{self.path} is truncated ({size} bytes): not a safetensors file")
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(
                    f"{self.path} is truncated or not a safetensors file (header says {header_len} bytes, "
                    f"file has {size})"
                )
            try:
                header = json.loads(self._file.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nesting too deep
                raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON ({exc})") from exc
            if not isinstance(header, dict):
                raise CheckpointError(f"{self.path}: the safetensors header is a JSON {type(header).__name__}, not an "
                                      "object of tensors; the file is corrupt or not a safetensors file")
            self.metadata = header.pop("__metadata__", None) or {}
            if not isinstance(self.metadata, dict):
                raise CheckpointError(f"{self.path}: the safetensors header's __metadata__ is not an object")
            data_start = 8 + header_len
            # name -> (info, absolute offset of its first byte in the file)
            self._tensors: dict[str, tuple[TensorInfo, int]] = {}
            for name, entry in header.items():
                info, begin = self._check_entry(name, entry, size - data_start)
                self._tensors[name] = (info, data_start + begin)
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise

    def _check_entry(self, name: str, entry: object, data_len: int) -> tuple[TensorInfo, int]:
        def malformed(what: str) -> CheckpointError:
            return CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry: {what}; "
                                   "the file is corrupt, download or save it again")

        def whole(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not isinstance(entry, dict):
            raise malformed(f"a JSON {type(entry).__name__}, not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise malformed(f"no {missing[0]!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise malformed(f"dtype {dtype!r:.40} is not a string")
        if not isinstance(shape, list) or not all(whole(d) for d in shape):
            raise malformed(f"shape {shape!r:.80} is not a list of whole numbers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise malformed(f"data_offsets {offsets!r:.80} is not [begin, end] with 0 <= begin <= end")
        shape, (begin, end) = tuple(shape), offsets
        if dtype not in _SAFETENSORS_DTYPES and dtype not in _STORED_DTYPES:
            raise TensorError(
                f"{self.path}: tensor {name!r} has dtype {dtype}, which edgeai does not convert "
                f"(supported: {', '.join(_SAFETENSORS_DTYPES)}, and U8 as MXFP4 blocks and scales); save the "
                "checkpoint in float32, float16 or bfloat16"
            )
        itemsize = (_SAFETENSORS_DTYPES[dtype][0] if dtype in _SAFETENSORS_DTYPES else _STORED_DTYPES[dtype]).itemsize
        expected = math.prod(shape) * itemsize  # exact: numpy's int64 product wraps for hostile shapes
        if end - begin != expected:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} of shape {list(shape)} {dtype} should take {expected} bytes, "
                f"the header gives {end - begin}; the file is corrupt"
            )
        if end > data_len:
            raise CheckpointError(
                f"{self.path} is truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"which has only {data_len} bytes; download or copy the file again"
            )
        return TensorInfo(name, shape, dtype, expected), begin

    def infos(self) -> Iterable[TensorInfo]:
        return (info for info, _ in self._tensors.values())

    def read(self, name: str) -> np.ndarray:
        info = self._tensors[name][0]
        if info.dtype in _STORED_DTYPES:
            raise TensorError(f"{self.path}: tensor {name!r} is {info.dtype}, which edgeai reads only as half of an "
                              "MXFP4 `_blocks`/`_scales` pair (config.json's quantization_config quant_method "
                              "\"mxfp4\"); this one is not part of such a pair")
        decode = _SAFETENSORS_DTYPES[info.dtype][1]
        raw = self.read_stored(name).reshape(-1)
        if decode is not None:
            values = decode(raw)
        elif raw.dtype == np.dtype("<f4"):
            values = raw  # a read-only view of the mapped file: no copy of the largest tensors
        else:
            values = raw.astype(np.float32)
        return values.reshape(info.shape)

    def read_stored(self, name: str) -> np.ndarray:
        """The tensor as stored (its own dtype, not decoded): a read-only view of the mapped file."""
        info, begin = self._tensors[name]
        storage = _STORED_DTYPES.get(info.dtype) or _SAFETENSORS_DTYPES[info.dtype][0]
        count = info.nbytes // storage.itemsize
        raw = np.frombuffer(self._mm, dtype=storage, count=count, offset=begin) if count else np.empty(0, storage)
        return raw.reshape(info.shape)

    def release(self, name: str) -> None:
        info, begin = self._tensors[name]
        if self._mm is None or info.nbytes == 0:
            return
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, begin + info.nbytes - start)
        except (OSError, ValueError, AttributeError):
            pass  # advisory only: platforms without madvise keep the pages until close

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a view is still referenced (say, by a traceback): the map closes when it goes
            self._mm = None
        self._file.close()

class SafetensorsCheckpoint:
    """A Hugging Face folder's weights: `model.safetensors`, or shards listed in an index."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, folder: Path):
        self.path = Path(folder)
        index = self.path / self.INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
            shard_names = sorted(set(weight_map.values()))
            missing = [s for s in shard_names if not (self.path / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shard(s) that are not in {self.path}: {', '.join(missing)}; "
                    "copy the missing shards into the folder"
                )
        else:
            shard_names = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = None
        self._files: list[SafetensorsFile] = []
        self._owner: dict[str, SafetensorsFile] = {}
        try:
            for shard in shard_names:
                f = SafetensorsFile(self.path / shard)
                self._files.append(f)
                for info in f.infos():
                    if info.name in self._owner:
                        raise CheckpointError(f"tensor {info.name!r} is stored twice: in {self._owner[info.name].path} and {f.path}")
                    self._owner[info.name] = f
            if weight_map is not None:
                absent = sorted(set(weight_map) - set(self._owner))
                if absent:
                    raise CheckpointError(
                        f"{index} lists tensor {absent[0]!r} in {weight_map[absent[0]]}, but that shard does not hold it "
                        f"({len(absent)} such tensor(s)); the shards and the index do not match"
                    )
        except BaseException:
            self.close()
            raise

    def infos(self) -> dict[str, TensorInfo]:
        return {info.name: info for f in self._files for info in f.infos()}

    def read(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)

    def read_stored(self, name: str) -> np.ndarray:
        return self._owner[name].read_stored(name)

    def release(self, name: str) -> None:
        self._owner[name].release(name)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()


class MXFP4Pairs:
    """A safetensors checkpoint whose matrices ship MXFP4-encoded, as OpenAI ships gpt-oss's experts:
    `X_blocks` [..., rows, n_in/32, 16] U8 and `X_scales` [..., rows, n_in/32] U8 (rows are outputs).

    Each pair appears as one tensor `X` of dtype "MXFP4" in the layout transformers dequantizes it
    to, [..., n_in, rows] (the last two axes swapped), so a spec's float transforms apply unchanged;
    `read` decodes it (ggml's values, which are transformers' too). `read_mxfp4` gives the shipped
    codes as ggml block_mxfp4 bytes [..., rows, n_in/32, 17], nibbles moved, nothing re-encoded.
    Every other tensor passes through.
    """

    DTYPE = "MXFP4"

    def __init__(self, inner: SafetensorsCheckpoint):
        self.inner = inner
        self.path = inner.path
        infos = inner.infos()
        self._pairs: dict[str, TensorInfo] = {}
        for name in infos:
            if not name.endswith(("_blocks", "_scales")):
                continue
            stem = name.removesuffix("_blocks").removesuffix("_scales")
            blocks, scales = infos.get(stem + "_blocks"), infos.get(stem + "_scales")
            if blocks is None or scales is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has no {(stem + '_scales') if scales is None else (stem + '_blocks')!r} "
                                      "beside it; MXFP4 weights ship as a _blocks/_scales pair, the checkpoint is incomplete")
            if stem in self._pairs:
                continue
            if blocks.dtype != "U8" or scales.dtype != "U8" or len(blocks.shape) < 3 or blocks.shape[-1] != 16 \
                    or blocks.shape[:-1] != scales.shape:
                raise CheckpointError(
                    f"{self.path}: {stem + '_blocks'!r} {blocks.dtype} {list(blocks.shape)} and {stem + '_scales'!r} "
                    f"{scales.dtype} {list(scales.shape)} are not an MXFP4 pair (U8 [..., rows, n_in/32, 16] and "
                    "U8 [..., rows, n_in/32]); the file is corrupt or not an MXFP4 checkpoint")
            *lead, rows, n_blocks, _ = blocks.shape
            self._pairs[stem] = TensorInfo(stem, (*lead, n_blocks * 32, rows), self.DTYPE, blocks.nbytes + scales.nbytes)
        self._infos = {n: i for n, i in infos.items() if n.removesuffix("_blocks").removesuffix("_scales") not in self._pairs}
        self._infos.update(self._pairs)

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read_mxfp4(self, name: str, select: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[np.ndarray]:
        """Pair `name`'s codes as ggml block_mxfp4 bytes, one leading index (expert) at a time:
        [rows, n_in/32, 17] each. `select` picks rows first, on arrays [lead, rows, ...] (a view)."""
        from edgeai.quant.blocks import mxfp4_from_openai

        blocks, scales = self.inner.read_stored(name + "_blocks"), self.inner.read_stored(name + "_scales")
        if select is not None:
            blocks, scales = select(blocks), select(scales)
        for index in range(blocks.shape[0]):
            yield mxfp4_from_openai(blocks[index], scales[index])

    def read(self, name: str) -> np.ndarray:
        if name not in self._pairs:
            return self.inner.read(name)
        from edgeai.quant.formats import FORMATS, dequantize

        ggml = np.stack(list(self.read_mxfp4(name)))
        values = dequantize(ggml, FORMATS["mxfp4"]).reshape(*ggml.shape[:-2], -1)  # [..., rows, n_in]
        return values.swapaxes(-1, -2)

    def release(self, name: str) -> None:
        for part in ((name + "_blocks", name + "_scales") if name in self._pairs else (name,)):
            self.inner.release(part)

    def close(self) -> None:
        self.inner.close()


class PickleCheckpoint:
    """PyTorch `.bin` checkpoints. Unpickling can run code, so this is only used when the user
    passed --trust-pickle, and then through ``torch.load(weights_only=True)``."""

    def __init__(self, folder: Path):
        self.path = Path(folder)
        try:
            import torch
        except ImportError as exc:
            raise CheckpointError(
                f"{self.path} holds a PyTorch pickle checkpoint; reading it needs torch "
                "(`pip install torch`), or convert it to safetensors first"
            ) from exc
        index = self.path / "pytorch_model.bin.index.json"
        if index.is_file():
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            shard_names = sorted(p.name for p in self.path.glob("*.bin"))
        self._tensors: dict[str, object] = {}
        for shard in shard_names:
            file = self.path / shard
            if not file.is_file():
                raise CheckpointError(f"{index} lists {shard}, which is not in {self.path}")
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{file} could not be loaded safely with torch.load(weights_only=True): {exc}") from exc
            self._tensors.update(state)

    def infos(self) -> dict[str, TensorInfo]:
        return {
            name: TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
            for name, t in self._tensors.items()
        }

    def read(self, name: str) -> np.ndarray:
        import torch

        return self._tensors[name].to(torch.float32).numpy()

    def release(self, name: str) -> None:
        pass

    def close(self) -> None:
        self._tensors.clear()


class GGUFSource:
    """A GGUF file as a source: its metadata, and its tensors dequantized to float32.

    The header is read by the validating reader every GGUF read goes through
    (`edgeai.gguf_header`). Names and layout are already GGUF's, so no name map applies; numpy order
    is the reverse of GGUF's `ne` order, as everywhere in edgeai.
    """

    def __init__(self, path: Path):
        from edgeai.gguf_header import read_header

        self.path = Path(path)
        self.header = read_header(self.path)

    def metadata(self) -> dict[str, object]:
        """Every key-value pair of the header, values as plain Python (str, int, float, bool, list).
        A string array that is not UTF-8 is a CheckpointError naming the key (GGUF strings are UTF-8)."""
        from edgeai.gguf_header import GGUFArray

        out: dict[str, object] = {}
        for key, value in self.header.metadata.items():
            if isinstance(value, GGUFArray):
                value = self.header.array(key)
                value = value.tolist() if isinstance(value, np.ndarray) else value
            out[key] = value
        return out

    def value_type(self, key: str):
        """The GGUF value type of a key, and the element type of an array (else None)."""
        from gguf import GGUFValueType

        from edgeai.gguf_header import GGUFArray

        value = self.header.metadata[key]
        vtype = GGUFValueType(self.header.value_types[key])
        return vtype, (GGUFValueType(value.element_type) if isinstance(value, GGUFArray) else None)

    def infos(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(name, t.numpy_shape, t.type_name, t.nbytes) for name, t in self.header.tensors.items()}

    def read(self, name: str) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.header.tensors[name]
        data = self.header.tensor_data(name)
        try:
            values = dequantize(data, GGMLQuantizationType(t.type))
        except (NotImplementedError, ValueError) as exc:  # a type gguf-py cannot decode (Q1_0, integer types)
            raise TensorError(f"{self.path}: tensor {name} is {t.type_name}, which edgeai cannot decode to re-encode it "
                              f"({exc}); convert from the original checkpoint instead") from exc
        return np.asarray(values, dtype=np.float32).reshape(t.numpy_shape)

    def release(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass
