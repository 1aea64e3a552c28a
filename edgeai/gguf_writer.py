"""A GGUF v3 writer as a small state machine: plan the whole header, write it, then stream each
tensor's data in the planned order.

    PLANNING --write_header()--> DATA --(every tensor written)--> finish() --> DONE

Calls out of order raise. Knowing every tensor's size up front is what lets data be streamed
with no tensor held in memory longer than its own write; stacked expert tensors are written
expert by expert through `write_tensor_chunks`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Sequence

import numpy as np
from gguf import GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class _State(enum.Enum):
    PLANNING = 1
    DATA = 2
    DONE = 3


@dataclass
class _PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order; the file stores the reverse (ggml's ne order)
    ggml_type: GGMLQuantizationType
    nbytes: int
    offset: int = 0  # from the start of the data section
    written: bool = False


def _pad(n: int, alignment: int) -> int:
    return (alignment - n % alignment) % alignment


def _encode_string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def infer_type(value: object) -> GGUFValueType:
    """Default GGUF type of a Python value: bool, uint32 for int, float32 for float, string, array."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        return GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY
    raise TypeError(f"no GGUF type for {type(value).__name__}")


def _encode_value(value: object, vtype: GGUFValueType, sub_type: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _encode_string(str(value))
    if vtype == GGUFValueType.ARRAY:
        items = list(value)  # type: ignore[arg-type]
        if sub_type is None:
            sub_type = infer_type(items[0]) if items else GGUFValueType.UINT32
        head = struct.pack("<IQ", int(sub_type), len(items))
        if sub_type == GGUFValueType.STRING:
            return head + b"".join(_encode_string(str(v)) for v in items)
        if sub_type in _SCALAR_FORMATS:
            arr = np.asarray(items, dtype=np.dtype(_SCALAR_FORMATS[sub_type][1:]).newbyteorder("<"))
            return head + arr.tobytes()
        raise TypeError(f"arrays of {sub_type.name} are not supported")
    return struct.pack(_SCALAR_FORMATS[vtype], value)


class GGUFWriter:
    """Writes one GGUF file to an open binary stream. See the module docstring for the call order."""

    def __init__(self, out: BinaryIO, *, alignment: int = DEFAULT_ALIGNMENT):
        assert alignment > 0 and alignment % 8 == 0
        self._out = out
        self._alignment = alignment
        self._kv: dict[str, bytes] = {}  # key -> encoded (type, value)
        self._kv_offsets: dict[str, int] = {}  # key -> file offset of its encoded value (for patching)
        self._tensors: list[_PlannedTensor] = []
        self._by_name: dict[str, _PlannedTensor] = {}
        self._state = _State.PLANNING
        self._next = 0  # index of the next tensor to write
        self._data_start = 0
        if alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment, GGUFValueType.UINT32)

    def _expect(self, state: _State, action: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"GGUFWriter: cannot {action} in state {self._state.name}")

    def add(self, key: str, value: object, vtype: GGUFValueType | None = None,
            sub_type: GGUFValueType | None = None) -> None:
        """Plan one metadata key. Types default from the Python value (see `infer_type`)."""
        self._expect(_State.PLANNING, "add metadata")
        if key in self._kv:
            raise ValueError(f"GGUFWriter: duplicate key {key!r}")
        vtype = vtype if vtype is not None else infer_type(value)
        self._kv[key] = struct.pack("<I", int(vtype)) + _encode_value(value, vtype, sub_type)

    def add_tensor(self, name: str, shape: Sequence[int], ggml_type: GGMLQuantizationType, nbytes: int) -> None:
        """Plan one tensor: its data will be exactly `nbytes` long."""
        self._expect(_State.PLANNING, "add a tensor")
        if name in self._by_name:
            raise ValueError(f"GGUFWriter: duplicate tensor {name!r}")
        t = _PlannedTensor(name, tuple(int(d) for d in shape), GGMLQuantizationType(ggml_type), int(nbytes))
        self._tensors.append(t)
        self._by_name[name] = t

    def write_header(self) -> None:
        """Write magic, metadata, tensor infos and padding; after this only tensor data follows."""
        self._expect(_State.PLANNING, "write the header")
        offset = 0
        for t in self._tensors:
            t.offset = offset
            offset += t.nbytes + _pad(t.nbytes, self._alignment)
        parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self._tensors), len(self._kv))]
        position = 24
        for key, encoded in self._kv.items():
            key_bytes = _encode_string(key)
            self._kv_offsets[key] = position + len(key_bytes)
            parts += [key_bytes, encoded]
            position += len(key_bytes) + len(encoded)
        for t in self._tensors:
            dims = tuple(reversed(t.shape))
            parts.append(_encode_string(t.name))
            parts.append(struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(t.ggml_type), t.offset))
        header = b"".join(parts)
        header += b"\0" * _pad(len(header), self._alignment)
        self._out.write(header)
        self._data_start = len(header)
        self._state = _State.DATA if self._tensors else _State.DONE

    def write_tensor(self, name: str, data: np.ndarray | bytes) -> None:
        """Write one tensor's bytes (the next planned tensor)."""
        self.write_tensor_chunks(name, (data,))

    def write_tensor_chunks(self, name: str, chunks: Iterable[np.ndarray | bytes]) -> None:
        """Write the next planned tensor from several pieces (e.g. one expert at a time)."""
        self._expect(_State.DATA, f"write tensor {name!r}")
        t = self._tensors[self._next]
        if t.name != name:
            raise RuntimeError(f"GGUFWriter: expected tensor {t.name!r} next, got {name!r}")
        written = 0
        for chunk in chunks:
            buf = memoryview(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk).cast("B")
            self._out.write(buf)
            written += len(buf)
        if written != t.nbytes:
            raise RuntimeError(f"GGUFWriter: tensor {name!r} planned {t.nbytes} bytes, got {written}")
        self._out.write(b"\0" * _pad(written, self._alignment))
        t.written = True
        self._next += 1
        if self._next == len(self._tensors):
            self._state = _State.DONE

    def patch_string(self, key: str, value: str) -> None:
        """Overwrite a planned string value with one of the same encoded length (e.g. a checksum
        known only after the data was read); requires a seekable stream."""
        if self._state is _State.PLANNING:
            raise RuntimeError("GGUFWriter: patch after write_header()")
        old = self._kv[key]
        new = struct.pack("<I", int(GGUFValueType.STRING)) + _encode_string(value)
        if len(new) != len(old):
            raise ValueError(f"GGUFWriter: patched value of {key!r} must keep its length ({len(old)} bytes)")
        here = self._out.tell()
        self._out.seek(self._kv_offsets[key])
        self._out.write(new)
        self._out.seek(here)
        self._kv[key] = new

    def finish(self) -> None:
        """Check that every planned tensor was written."""
        if self._state is not _State.DONE:
            missing = [t.name for t in self._tensors if not t.written]
            raise RuntimeError(f"GGUFWriter: {len(missing)} tensor(s) not written, first {missing[0]!r}")
        self._out.flush()
