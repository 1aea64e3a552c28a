"""One GGUF header reader (`edgeai.gguf_header`, the validating C++ one) behind every command:
a load parses the header once, and inspect, fit and convert answer a bad file as loading does."""

from __future__ import annotations

import struct

import pytest

import edgeai
from edgeai.devices import get_profile
from edgeai.errors import CheckpointError, EdgeAIError
from edgeai.fit import fit
from edgeai.gguf_header import GGUFArray, parse_count, read_header
from edgeai.inspect import inspect as inspect_artifact


@pytest.mark.parametrize("backend", ["auto", "native", "llama.cpp"])
def test_a_load_parses_the_header_once(tiny_chat_gguf, backend):
    """Choosing the backend, checking the vocabulary, planning and the engine share one parse by our
    reader (llama.cpp's own reads of the file, for tokenization, are not ours and not counted)."""
    before = parse_count()
    with edgeai.load(tiny_chat_gguf, backend=backend) as m:
        assert m.generate("hi", max_tokens=2, temperature=0) is not None
    assert parse_count() - before == 1


def test_header_values_and_arrays(tiny_chat_gguf):
    header = read_header(tiny_chat_gguf)
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, GGUFArray) and tokens.element_type == 8 and len(tokens) > 100
    texts = header.array("tokenizer.ggml.tokens")
    assert len(texts) == len(tokens) and all(isinstance(t, str) for t in texts)
    types = header.array("tokenizer.ggml.token_type")
    assert types.shape == (len(tokens),) and types.dtype.kind == "i"
    embd = header.tensors["token_embd.weight"]
    assert embd.numpy_shape == (len(tokens), header.metadata["llama.embedding_length"])
    assert header.tensor_data("token_embd.weight").nbytes == embd.nbytes


def _key_at(data: bytes, key: bytes) -> int:
    """Offset just past a metadata key's stored name (u64 length, bytes): its value type follows."""
    at = data.find(struct.pack("<Q", len(key)) + key)
    assert at > 0, key
    return at + 8 + len(key)


def _all_refuse(bad, tmp_path, match: str) -> None:
    """inspect, fit, convert and the native backend refuse `bad` with the reader's message."""
    for call in (lambda: inspect_artifact(bad), lambda: fit(bad, get_profile("pi5-8gb-sd")),
                 lambda: edgeai.convert(bad, tmp_path / "out.gguf"),
                 lambda: edgeai.load(bad, backend="native")):
        with pytest.raises(EdgeAIError, match=match):  # BackendError from load, else CheckpointError
            call()
    assert not (tmp_path / "out.gguf").exists()


def test_an_array_claiming_2_62_elements_is_refused_at_once(tiny_chat_gguf, tmp_path):
    """gguf-py's reader looped on this, growing past 2.5 GB, in inspect, convert and fit."""
    data = bytearray(tiny_chat_gguf.read_bytes())
    at = _key_at(bytes(data), b"tokenizer.ggml.token_type")
    assert struct.unpack_from("<II", data, at) == (9, 5)  # an array of int32
    struct.pack_into("<Q", data, at + 8, 2**62)
    bad = tmp_path / "long.gguf"
    bad.write_bytes(bytes(data))
    _all_refuse(bad, tmp_path, r"long.gguf: not a valid GGUF file: .*array")


def test_a_tensor_offset_near_2_64_is_refused(tiny_chat_gguf, tmp_path):
    """`inspect` used to exit 0 on it."""
    data = bytearray(tiny_chat_gguf.read_bytes())
    name = b"output_norm.weight"
    at = data.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<Q", data, at + 4 + 8 * n_dims + 4, 2**64 - 32)
    bad = tmp_path / "offset.gguf"
    bad.write_bytes(bytes(data))
    _all_refuse(bad, tmp_path, "offset.gguf: tensor 'output_norm.weight' lies beyond the end of the file")


def test_metadata_that_is_not_utf8(tiny_chat_gguf, tmp_path):
    """A string value that is not UTF-8 is shown with U+FFFD (inspect, fit, loading); a token text
    that is not UTF-8 is refused by convert, naming the key and the token (GGUF strings are UTF-8)."""
    data = bytearray(tiny_chat_gguf.read_bytes())
    at = _key_at(bytes(data), b"tokenizer.ggml.pre")
    n = struct.unpack_from("<Q", data, at + 4)[0]
    data[at + 12] = 0xFF  # the value's first byte
    bad = tmp_path / "pre.gguf"
    bad.write_bytes(bytes(data))
    assert inspect_artifact(bad).tokenizer["pre"].startswith("\ufffd") and n > 1
    tokens = read_header(tiny_chat_gguf).array("tokenizer.ggml.tokens")
    token = next(t for t in tokens if len(t) == 3 and t.isascii() and t.isalpha()).encode()
    data = bytearray(tiny_chat_gguf.read_bytes())
    at = data.find(struct.pack("<Q", 3) + token) + 8
    assert at > 8
    data[at] = 0xFF
    bad = tmp_path / "token.gguf"
    bad.write_bytes(bytes(data))
    assert inspect_artifact(bad).tokenizer["tokens"] == len(tokens)
    with pytest.raises(CheckpointError, match=r"token.gguf: element \d+ of metadata tokenizer.ggml.tokens is not UTF-8"):
        edgeai.convert(bad, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_an_array_key_that_is_not_utf8(tiny_chat_gguf, tmp_path):
    """The key shows U+FFFD, and its array is still read by the key's own bytes (found by the
    gguf_metadata fuzzer: the replaced key was looked up again and reported missing)."""
    data = bytearray(tiny_chat_gguf.read_bytes())
    at = _key_at(bytes(data), b"tokenizer.ggml.merges") - len(b"merges")
    data[at + 1] = 0xFF  # "tokenizer.ggml.m\xffrges"
    bad = tmp_path / "key.gguf"
    bad.write_bytes(bytes(data))
    header = read_header(bad)
    key = next(k for k in header.metadata if k.startswith("tokenizer.ggml.m\ufffd"))
    assert header.array(key) == read_header(tiny_chat_gguf).array("tokenizer.ggml.merges")
    out = edgeai.convert(bad, tmp_path / "out.gguf", outtype="f32")
    assert len(read_header(out).array(key)) == len(header.metadata[key])


def test_newer_ggml_types_are_read_and_left_to_llama_cpp(tiny_chat_gguf, tmp_path):
    """MXFP4 (added to ggml after BF16) and IQ4_NL: the reader knows their block layout and inspect
    counts them; one the native engine does not run (IQ4_NL) is named, pointing to llama.cpp."""
    from edgeai.runtimes.native import NativeBackend

    data = bytearray(tiny_chat_gguf.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    for code, type_name, block, size in ((39, "MXFP4", 32, 17), (20, "IQ4_NL", 32, 18)):  # inside the F32's bytes
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, code)
        bad = tmp_path / f"{type_name}.gguf"
        bad.write_bytes(bytes(data))
        t = read_header(bad).tensors[name.decode()]
        assert t.type_name == type_name and t.nbytes == t.n_elements // block * size
        assert inspect_artifact(bad).types[type_name].count == 1
    reason = NativeBackend.can_run(bad)  # IQ4_NL: no kernel here
    assert "IQ4_NL" in reason and "llama.cpp" in reason
