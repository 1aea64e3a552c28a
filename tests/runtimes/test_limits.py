"""Resource knobs and inputs that used to take the process or the machine down, or end in a
traceback: thread counts past the CPUs, token ids outside the vocabulary, vocabularies llama.cpp's
loader aborts on, header bytes that are not UTF-8 in the reader's messages."""

from __future__ import annotations

import logging
import struct

import pytest

import edgeai
from edgeai.devices import checked_threads
from edgeai.devices.cores import allowed_cpus
from edgeai.errors import BackendError, CheckpointError, OptionError, TokenizerError


def test_threads_are_capped_at_the_cpus_with_a_warning(tiny_chat_gguf, caplog):
    cpus = len(allowed_cpus())
    with caplog.at_level(logging.WARNING, logger="edgeai.devices"):
        assert checked_threads(1000) == cpus
    assert f"threads=1000 is more than the {cpus} CPUs" in caplog.text
    assert checked_threads(1) == 1 and checked_threads(None) >= 1
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(OptionError, match="threads must be a whole number >= 1"):
            checked_threads(bad)
    for backend in ("native", "llama.cpp"):
        with edgeai.load(tiny_chat_gguf, backend=backend, threads=1000) as m:
            assert m.stats().threads == cpus


@pytest.mark.parametrize("backend", ["native", "llama.cpp"])
def test_token_ids_outside_the_vocabulary_are_refused(tiny_chat_gguf, backend):
    """llama.cpp's detokenizer aborts the process (std::out_of_range) on them."""
    with edgeai.load(tiny_chat_gguf, backend=backend) as m:
        for ids in ([10**9], [-1], [5, m.backend.n_vocab]):
            with pytest.raises(OptionError, match="outside the vocabulary"):
                m.detokenize(ids)
            with pytest.raises(OptionError, match="outside the vocabulary"):
                m.generate(ids, max_tokens=2)
        assert m.generate([5, 6], max_tokens=2, temperature=0) is not None


def _stored_at(data: bytes, text: bytes) -> int:
    """Offset of the bytes of `text` where the file stores it as a GGUF string (u64 length, bytes)."""
    at = data.find(struct.pack("<Q", len(text)) + text)
    assert at > 0, text
    return at + 8


@pytest.mark.parametrize("how", ["same text", "NUL inside"])
@pytest.mark.parametrize("backend", ["native", "llama.cpp", "auto"])
def test_a_vocabulary_with_two_tokens_alike_is_refused(tiny_chat_gguf, tmp_path, how, backend):
    """Two tokens of the same text (one changed byte, or a NUL that ends one early as llama.cpp reads
    it) abort llama.cpp's vocabulary loader; the reader refuses the file first, naming the tokens."""
    from edgeai.runtimes.vocab import GGUFVocab

    vocab = GGUFVocab(tiny_chat_gguf)
    pieces = [vocab.detokenize([t]) for t in range(vocab.n_vocab)]
    vocab.close()
    twos = [p for p in pieces if len(p) == 2 and p.isalpha() and pieces.count(p) == 1]
    data = bytearray(tiny_chat_gguf.read_bytes())
    if how == "same text":  # "ab", "cd" -> "ab", "ab"
        at = _stored_at(bytes(data), twos[1])
        data[at:at + 2] = twos[0]
    else:  # "ab" -> "a\0", as llama.cpp reads it "a", which is a token too
        two = next(p for p in twos if p[:1] in pieces)
        at = _stored_at(bytes(data), two)
        data[at:at + 2] = two[:1] + b"\0"
    bad = tmp_path / "dup.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match="of tokenizer.ggml.tokens have the same text"):
        edgeai.load(bad, backend=backend)


def test_a_format_error_quoting_bytes_that_are_not_utf8_reaches_python(tiny_chat_gguf, tmp_path):
    """The native reader's messages quote header bytes (tensor names); bytes that are not UTF-8 are
    written as \\xNN instead of turning the error into a UnicodeDecodeError."""
    data = bytearray(tiny_chat_gguf.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = _stored_at(bytes(data), name)
    data[at] = 0xFF  # "\xFFlk.0.attn_q.weight"
    n_dims = struct.unpack_from("<I", data, at + len(name))[0]
    struct.pack_into("<I", data, at + len(name) + 4 + 8 * n_dims, 99)  # an unknown type: the reader quotes the name
    bad = tmp_path / "name.gguf"
    bad.write_bytes(bytes(data))
    from edgeai.gguf_header import read_header

    with pytest.raises(CheckpointError, match=r"tensor '\\xFFlk.0.attn_q.weight' has unknown type id 99"):
        read_header(bad)
    with pytest.raises(BackendError, match=r"tensor '\\xFFlk.0.attn_q.weight' has unknown type id 99"):
        edgeai.load(bad, backend="native")


def test_sampling_numbers_must_be_finite():
    from edgeai.runtimes.base import Sampling

    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"repeat_penalty": float("nan")},
                {"repeat_penalty": float("inf")}, {"top_p": float("nan")}, {"min_p": float("nan")}):
        with pytest.raises(OptionError, match="must be"):
            Sampling(**bad)


@pytest.mark.parametrize("backend", ["native", "llama.cpp"])
def test_a_context_of_zero_is_an_error_not_the_default(tiny_chat_gguf, backend):
    for n_ctx in (0, -1):
        with pytest.raises(OptionError, match=f"n_ctx={n_ctx} is outside"):
            edgeai.load(tiny_chat_gguf, backend=backend, n_ctx=n_ctx)


def test_fit_refuses_a_context_of_zero(tiny_chat_gguf):
    from edgeai.devices import get_profile
    from edgeai.fit import fit

    with pytest.raises(OptionError, match="n_ctx must be >= 1"):
        fit(tiny_chat_gguf, get_profile("pi4-4gb"), n_ctx=0)
