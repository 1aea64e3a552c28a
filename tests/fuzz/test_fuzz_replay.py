"""The Python fuzz harnesses (harnesses.py) on their committed corpora, in plain Python: every seed
the project's writers made and every input a fuzzer once failed on (crash-*) must end in a clear
EdgeAIError or pass, with no other exception and no crash of the process. The C++ harnesses'
corpora replay under the sanitizers in tests/runtimes/test_sanitizers.py. Below them, each bug the
fuzzers found, checked for its message."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harnesses import HARNESSES  # noqa: E402
from seeds import CORPORA  # noqa: E402

from edgeai.errors import CheckpointError, TokenizerError  # noqa: E402

CASES = [(name, f) for name in HARNESSES for f in sorted(CORPORA[name].iterdir())]


@pytest.mark.parametrize("harness, path", CASES, ids=[f"{n}/{p.name}" for n, p in CASES])
def test_corpus_input_replays(harness, path):
    HARNESSES[harness](path.read_bytes())


def test_every_corpus_has_seeds_and_is_small():
    """The committed corpora: seeds for each harness, and all of them well under 1 MB together."""
    total = 0
    for name, folder in CORPORA.items():
        files = list(folder.iterdir())
        assert any(f.name.startswith("seed-") for f in files), name
        total += sum(f.stat().st_size for f in files)
    assert total < 512 * 1024, total


def _gguf_one_tensor(name: bytes, shape: tuple[int, ...], ggml_type: int = 0) -> bytes:
    """A GGUF v3 with no metadata and one tensor's header (no data beyond 32 bytes)."""
    data = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
    data += struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", ggml_type, 0)
    return data + b"\0" * ((-len(data)) % 32 + 32)


def test_a_tensor_whose_byte_count_overflows_is_refused(tmp_path):
    """[2^40, 2^23] F32 is 2^65 bytes, 0 in 64 bits: the reader took it for an empty tensor."""
    from edgeai.gguf_header import read_header

    path = tmp_path / "overflow.gguf"
    path.write_bytes(_gguf_one_tensor(b"blk.0.attn_q.weight", (2**40, 2**23)))
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_q.weight' of shape \[1099511627776, 8388608\] F32 "
                                              r"needs more bytes \(over 2\^64\) than the file has \(128\)"):
        read_header(path)
    path.write_bytes(_gguf_one_tensor(b"t", (64, 2)))  # 512 bytes in a file of 96: no overflow, still too big
    with pytest.raises(CheckpointError, match=r"tensor 't' of shape \[64, 2\] F32 needs more bytes \(512\) than the file has"):
        read_header(path)


def test_a_sentencepiece_vocabulary_without_byte_tokens_is_refused(tmp_path):
    """llama.cpp's SentencePiece tokenizer looks byte tokens up with unordered_map::at: text it spells
    in bytes aborted the process (std::out_of_range through the C API) when they were missing."""
    import edgeai

    bad = tmp_path / "spm.gguf"
    bad.write_bytes((CORPORA["gguf_metadata"] / "crash-spm-without-byte-tokens").read_bytes())
    for backend in ("native", "llama.cpp"):
        with pytest.raises(TokenizerError, match=r"has 0 of the 256 byte tokens <0x00>..<0xFF> \(<0x00> is missing\)"):
            edgeai.load(bad, backend=backend)


@pytest.mark.parametrize("case, message", [
    ("crash-header-not-an-object", "the safetensors header is a JSON int, not an object of tensors"),
    ("crash-deep-nesting", "the safetensors header is not valid JSON"),
    ("crash-negative-dim", r"tensor 'a' has a malformed header entry: shape \[-1, 1\] is not a list of whole numbers"),
    ("crash-infinite-dim", r"tensor 'a' has a malformed header entry: shape \[inf\] is not a list of whole numbers"),
    ("crash-dim-past-int64", r"tensor 'a' of shape \[1000000000000000000000000000000\] F32 should take 4000"),
    ("crash-count-wraps-int64", r"tensor 'a' of shape \[4294967296, 4294967296\] F32 should take 73786976294838206464 "
                                r"bytes, the header gives 0"),
    ("crash-dtype-a-list", r"tensor 'a' has a malformed header entry: dtype \['F32'\] is not a string"),
])
def test_a_malformed_safetensors_header_is_a_checkpoint_error(tmp_path, case, message):
    """Headers that ended in TypeError, OverflowError, RecursionError or a wrong-shaped read: a JSON
    value that is not an object (found by the fuzzer), and dimensions or dtypes of the wrong JSON type,
    nesting past Python's recursion limit, and a shape whose int64 element count wrapped around to 0
    (found writing the harness; the fuzzer reaches the same code)."""
    from edgeai.converters.sources import SafetensorsCheckpoint

    (tmp_path / "model.safetensors").write_bytes((CORPORA["safetensors"] / case).read_bytes())
    with pytest.raises(CheckpointError, match=message):
        SafetensorsCheckpoint(tmp_path)


def test_gguf_metadata_that_is_not_utf8_is_a_checkpoint_error(tmp_path):
    """String arrays that are not UTF-8 ended a re-encoding in a UnicodeDecodeError when gguf-py read
    the metadata (found by the gguf_metadata fuzzer); the one header reader names the key and element."""
    from edgeai.converters.plan import open_plan

    # the fuzzer's input (crash-string-array-not-utf8) is refused by the native reader's checks now; the
    # same bytes in a vocabulary it accepts: token "ab" -> "a\xff"
    data = bytearray((CORPORA["gguf_metadata"] / "seed-gpt2").read_bytes())
    at = data.find(struct.pack("<Q", 2) + b"ab") + 8
    data[at + 1] = 0xFF
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad.gguf: element \d+ of metadata tokenizer.ggml.tokens is not UTF-8"):
        open_plan(bad, "f16")


def test_an_onnx_folder_with_a_huge_layer_count_is_refused_at_once(tmp_path):
    """num_hidden_layers of 30 digits: the cache names of every layer were made up front (minutes and
    GBs; found by the onnx_config fuzzer as a timeout)."""
    from harnesses import ONNX_SEPARATOR

    from edgeai.runtimes.onnxrt import read_folder_config

    genai, _, tok = (CORPORA["onnx_config"] / "crash-huge-layer-count").read_bytes().partition(ONNX_SEPARATOR)
    (tmp_path / "genai_config.json").write_bytes(genai)
    (tmp_path / "tokenizer_config.json").write_bytes(tok)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers 666666666666666666666666666661 is implausible"):
        read_folder_config(tmp_path)


def test_a_gguf_with_a_hostile_array_count_is_refused_at_once(tmp_path):
    """gguf-py's reader looped for minutes over an array whose count overflows (found by the
    gguf_metadata fuzzer as a timeout); the native reader's checks now come first."""
    import time

    from edgeai.converters.sources import GGUFSource

    bad = tmp_path / "bad.gguf"
    bad.write_bytes((CORPORA["gguf_metadata"] / "crash-gguf-py-hangs-on-array-count").read_bytes())
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"array length overflows in key 'tokenizer.ggml.scores'"):
        GGUFSource(bad)
    assert time.monotonic() - start < 5
