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
    for backend in ("native", "auto"):  # corrupt: an error of the file, with no "llama.cpp can run it" advice
        with pytest.raises(CheckpointError, match=r"tensor '\\xFFlk.0.attn_q.weight' has unknown type id 99") as err:
            edgeai.load(bad, backend=backend)
        assert "llama.cpp" not in str(err.value)


def test_sampling_numbers_must_be_finite():
    from edgeai.runtimes.base import Sampling

    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"repeat_penalty": float("nan")},
                {"repeat_penalty": float("inf")}, {"top_p": float("nan")}, {"min_p": float("nan")}):
        with pytest.raises(OptionError, match="must be"):
            Sampling(**bad)


@pytest.mark.parametrize("backend", ["native", "llama.cpp"])
def test_a_context_of_zero_is_an_error_not_the_default(tiny_chat_gguf, backend):
    for n_ctx in (0, -1, 10**6, 2.5, "512"):
        with pytest.raises(OptionError, match=f"n_ctx must be a whole number in 1..512, got {n_ctx!r}"):
            edgeai.load(tiny_chat_gguf, backend=backend, n_ctx=n_ctx)


def test_a_context_of_zero_is_refused_by_every_command_that_takes_it(tiny_chat_gguf, tiny_chat_onnx, tmp_path):
    from typer.testing import CliRunner

    from edgeai.cli import app

    text = tmp_path / "t.txt"
    text.write_text("hello " * 50)
    for args in (["run", str(tiny_chat_gguf), "hi"], ["run", str(tiny_chat_gguf), "--plan"],
                 ["run", str(tiny_chat_onnx), "hi"], ["chat", str(tiny_chat_gguf)],
                 ["fit", str(tiny_chat_gguf), "--device", "pi4-4gb"],
                 ["eval", str(tiny_chat_gguf), "-r", str(tiny_chat_gguf), "--text", str(text)]):
        result = CliRunner().invoke(app, [*args, "--ctx", "0"])
        assert result.exit_code == 1 and "n_ctx" in result.output and "must be a whole number" in result.output, \
            (args, result.output)
        assert "Traceback" not in result.output


def test_corrupt_ggufs_get_no_llama_cpp_advice_unsupported_ones_do(tiny_chat_gguf, tmp_path):
    """Only a reason llama.cpp can handle (an architecture or tensor type the native engine lacks)
    suggests it; a corrupt file is an error of the file for every backend."""
    data = bytearray(tiny_chat_gguf.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = _stored_at(bytes(data), name)
    n_dims = struct.unpack_from("<I", data, at + len(name))[0]
    type_at = at + len(name) + 4 + 8 * n_dims
    struct.pack_into("<I", data, type_at, 20)  # IQ4_NL: a real ggml type the native engine does not run
    newer = tmp_path / "newer.gguf"
    newer.write_bytes(bytes(data))
    from edgeai.runtimes.native import NativeBackend

    assert "the llama.cpp backend can" in NativeBackend.can_run(newer)
    with pytest.raises(BackendError, match="it can run with --backend llama.cpp"):
        edgeai.load(newer, backend="native")
    data[:] = tiny_chat_gguf.read_bytes()
    struct.pack_into("<Q", data, 8, 10**6)  # a tensor count the file cannot hold
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(bytes(data))
    for backend in ("native", "auto"):
        with pytest.raises(CheckpointError) as err:
            edgeai.load(broken, backend=backend)
        assert "llama.cpp" not in str(err.value)


def test_resource_knobs_are_bounded_before_anything_starts(tiny_chat_gguf):
    from edgeai.converters.pipeline import MAX_CALIB_CTX
    from edgeai.bench import bench
    from edgeai.runtimes.native import NativeBackend

    with edgeai.load(tiny_chat_gguf, backend="native", n_ctx=64, threads=1) as m:
        for bad in (0, -5, 2.5, "8", None):
            with pytest.raises(OptionError, match="max_tokens must be a whole number >= 1"):
                m.generate("hi", max_tokens=bad)
        with pytest.raises(OptionError, match="top_k must be a whole number"):
            m.generate("hi", top_k=2**40)
        with pytest.raises(OptionError, match="seed must be a whole number"):
            m.generate("hi", seed="x")
        with pytest.raises(OptionError, match="temperature must be a number"):
            m.generate("hi", temperature="hot")
        assert m.generate("hi", max_tokens=10**6, temperature=0)  # ends when the context is full
    for options, message in (({"slots": -1}, r"expert_store\['slots'\] must be a whole number in 0\.\."),
                             ({"slots": 10**9}, r"expert_store\['slots'\] must be a whole number in 0\.\.2, "),
                             ({"io_threads": 10**6}, "io_threads'.* in 1..64"),
                             ({"prefetch_top": -1}, "prefetch_top"), ({"retries": 10**9}, "retries'.* in 0..100"),
                             ({"policy": "fifo"}, "policy'.* one of next-use"), ({"prefetch": 1}, "True or False"),
                             ({"io": "mmap"}, r"expert_store\['io'\] must be one of auto, uring, pread, got 'mmap'"),
                             ({"slot": 4}, "unknown expert_store option 'slot'")):
        with pytest.raises(OptionError, match=message):
            NativeBackend(tiny_chat_gguf, n_ctx=64, threads=1, expert_store=options)
    for kwargs, message in (({"n_prompt": 0}, "n_prompt"), ({"n_gen": 10**9}, "n_gen"), ({"repeats": 0}, "repeats"),
                            ({"threads": 0}, "threads must be a whole number >= 1")):
        with pytest.raises(OptionError, match=message):
            bench(tiny_chat_gguf, ["native"], **kwargs)
    for kwargs, message in (({"threads": -1}, "threads must be a whole number >= 0"),
                            ({"calib_ctx": 1}, "calib_ctx"), ({"calib_ctx": MAX_CALIB_CTX + 1}, "calib_ctx")):
        with pytest.raises(OptionError, match=message):
            edgeai.convert(tiny_chat_gguf, tiny_chat_gguf.parent / "never.gguf", **kwargs)
    assert not (tiny_chat_gguf.parent / "never.gguf").exists()


def test_a_context_this_machine_cannot_hold_is_refused(tiny_chat_gguf, monkeypatch):
    """Without a budget the weights may page from the file, but the KV cache must fit in memory."""
    import psutil

    from edgeai.runtimes.native import NativeBackend

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=2**20))
    with pytest.raises(OptionError, match="n_ctx=512 needs .* of KV cache and compute buffers .* more than this "
                                          "machine's 1.00 MiB of memory"):
        NativeBackend(tiny_chat_gguf, n_ctx=512, threads=1)


def test_fit_refuses_a_context_of_zero(tiny_chat_gguf):
    from edgeai.devices import get_profile
    from edgeai.fit import fit

    with pytest.raises(OptionError, match="n_ctx must be a whole number >= 1"):
        fit(tiny_chat_gguf, get_profile("pi4-4gb"), n_ctx=0)


def test_the_plan_of_a_dense_model_says_nothing_of_experts():
    """`run --plan` printed "reads 0 B per expert" for dense models whose layers were streamed
    (the bundled SmolLM2: 30 layers, where streaming them needs less than holding them)."""
    from typer.testing import CliRunner

    from edgeai.cli import app
    from edgeai.paths import default_model_path

    path = default_model_path()
    plan = edgeai.plan(path, n_ctx=64, threads=1)
    assert plan.minimum < plan.total and not plan.experts
    for budget, footer in ((None, None), ((plan.minimum + plan.total) // 2, f"Layers are streamed from {path.name}: every token reads all 30")):
        args = ["run", str(path), "--plan", "--ctx", "64", "-t", "1"]
        result = CliRunner().invoke(app, args + (["--memory-budget", str(budget)] if budget else []),
                                    env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        assert "expert" not in result.output.lower()
        assert footer is None or footer in result.output, result.output
