"""A GGUF file's header, read once by the validating C++ reader (`edgeai._native.GGUFFile`).

Every reader of GGUF headers in edgeai goes through `read_header`: loading (planning and the engine
take the same parsed header), `inspect`, `fit`, `eval` and the converter's GGUF source. The C++
reader checks every count, length, offset and shape against the file before anything is used, so a
bad file is one clear CheckpointError here, whichever command met it. (gguf-py stays the writer's
library and the tests' second opinion.)

Metadata values are plain Python; arrays stay in the file until asked for (`GGUFHeader.array`):
a 262,144-token vocabulary costs nothing to a caller that only wants the hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeai.errors import CheckpointError, TokenizerError

# GGUF value type ids (the format's own numbering) of the numeric array elements -> numpy dtype
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                 11: "<i8", 12: "<f8"}
STRING = 8  # GGUF value type id of a string
ARRAY = 9


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array left in the file: its element type and length (`GGUFHeader.array` reads it)."""

    element_type: int
    length: int
    offset: int  # file offset of the first element
    key: bytes = b""  # the key as the file spells it (a key that is not UTF-8 shows U+FFFD in metadata)

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the header: ggml type id and name, ggml-order shape (row length first), bytes."""

    name: str
    type: int
    type_name: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """The shape in numpy order ([rows, row length] for a matrix), as edgeai uses everywhere."""
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class GGUFHeader:
    """A parsed, validated GGUF header. `native` is the C++ object the engine and the planner take;
    it keeps the file mapped (read-only) while anything holds it."""

    path: Path
    version: int
    alignment: int
    size: int
    metadata: dict[str, object]  # arrays as GGUFArray
    value_types: dict[str, int]  # key -> GGUF value type id (ARRAY for arrays)
    tensors: dict[str, GGUFTensor]
    native: object = field(repr=False, compare=False)

    def get(self, key: str, default=None):
        """A metadata value, or `default` when the key is absent."""
        return self.metadata.get(key, default)

    def array(self, key: str, *, errors: str = "strict") -> list[str] | np.ndarray:
        """An array's elements: a list of str for strings (decoded as UTF-8 with `errors`: "strict"
        raises CheckpointError naming the key and element, "replace" shows bad bytes as U+FFFD), else a
        numpy array of the element type. A missing key or a non-array is a CheckpointError."""
        ref = self.metadata.get(key)
        if not isinstance(ref, GGUFArray):
            raise CheckpointError(f"{self.path}: metadata {key} is {'missing' if ref is None else 'not an array'}")
        if ref.element_type == STRING:
            from edgeai.native_bridge import native

            try:
                items = self.native.string_array(ref.key)
            except native.GGUFFormatError as exc:  # cannot happen for a key of this header; said clearly if it does
                raise CheckpointError(str(exc)) from exc
            out = []
            for i, b in enumerate(items):
                try:
                    out.append(b.decode("utf-8", errors))
                except UnicodeDecodeError:
                    raise CheckpointError(f"{self.path}: element {i} of metadata {key} is not UTF-8 "
                                          f"({b[:40]!r}); GGUF strings must be UTF-8") from None
            return out
        dtype = np.dtype(_ARRAY_DTYPES[ref.element_type])
        values = np.fromfile(self.path, dtype=dtype, count=ref.length, offset=ref.offset)
        return values.astype(bool) if ref.element_type == 7 else values

    def tensor_data(self, name: str) -> np.ndarray:
        """A tensor's bytes as a read-only uint8 memory map (its offset and size were validated)."""
        t = self.tensors[name]
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and validate the header of the GGUF at `path` (tensor data is not read).

    Raises CheckpointError naming the file and what is wrong (a missing or truncated file, a bad
    count, length, offset or shape), or TokenizerError for a vocabulary llama.cpp's loader would
    abort the process on (two tokens of the same text)."""
    from edgeai.native_bridge import native

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; a GGUF model is one .gguf file")
    try:
        f = native.GGUFFile(str(path))
    except native.GGUFVocabularyError as exc:
        raise TokenizerError(str(exc)) from exc
    except native.GGUFFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    metadata: dict[str, object] = {}
    value_types: dict[str, int] = {}
    for key, (vtype, value, raw_key) in f.metadata().items():
        value_types[key] = vtype
        metadata[key] = GGUFArray(value[1], value[2], value[3], raw_key) if isinstance(value, tuple) else value
    tensors = {}
    for name, ggml_type, type_name, shape, offset, nbytes in f.tensors():
        tensors[name] = GGUFTensor(name, ggml_type, type_name, tuple(shape), offset, nbytes)
    return GGUFHeader(path, f.version, f.alignment, f.size, metadata, value_types, tensors, f)


def parse_count() -> int:
    """GGUF headers this process has parsed with the C++ reader (tests hold a load to one)."""
    from edgeai.native_bridge import native

    return int(native.gguf_parse_count())
