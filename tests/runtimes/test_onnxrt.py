"""The onnxruntime backend: the Backend protocol on exported tiny models, and `edgeai eval` on ONNX folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgeai
from edgeai.errors import CheckpointError, OptionError
from edgeai.runtimes import onnxrt
from edgeai.runtimes.base import GREEDY, Backend, Sampling
from edgeai.runtimes.onnxrt import OnnxBackend
from helpers import TINY_ARCHS, VARIED_TEXT, corpus, make_tiny_checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """smollm (byte-level BPE, tied) and llama (SentencePiece): checkpoint, fp32 and int4 folders."""
    root = tmp_path_factory.mktemp("onnxrt")
    out = {}
    for name in ("smollm", "llama"):
        arch = next(a for a in TINY_ARCHS if a.name == name)
        src = make_tiny_checkpoint(root / name, arch)
        out[name] = {"src": src,
                     "fp32": edgeai.convert(src, root / f"{name}-fp32", format="onnx", quant="fp32"),
                     "int4": edgeai.convert(src, root / f"{name}-int4", format="onnx", quant="int4")}
    return out


def test_shared_kv_buffers_match_the_copying_cache(exported, tmp_path, monkeypatch):
    """In-place past/present buffers (grown twice, truncated, reset) give the logits of the cache
    that a folder without past_present_share_buffer gets (each run's present is a new value)."""
    monkeypatch.setattr(onnxrt, "KV_MIN_CAPACITY", 16)
    copying_folder = tmp_path / "copying"
    shutil.copytree(exported["llama"]["int4"], copying_folder)
    config = json.loads((copying_folder / "genai_config.json").read_text())
    config["search"]["past_present_share_buffer"] = False
    (copying_folder / "genai_config.json").write_text(json.dumps(config))
    shared, copying = OnnxBackend(exported["llama"]["int4"], threads=1), OnnxBackend(copying_folder, threads=1)
    assert shared.shared_kv and not copying.shared_kv and shared.capacity == 16
    tokens = [int(t) for t in np.random.default_rng(3).integers(3, shared.n_vocab, 40)]

    def same(steps) -> None:
        for chunk in steps:
            a, b = shared.step(chunk), copying.step(chunk)
            assert a == b and np.abs(shared.logits() - copying.logits()).max() < 1e-5
        assert shared.history == copying.history

    for b in (shared, copying):
        b.set_sampling(GREEDY)
    same([tokens[:20]])  # prefill past the first size: 20 positions
    assert shared.capacity == 32
    same([[t] for t in tokens[20:]])  # decode: grows again at 33
    assert shared.capacity == 64 and shared.n_past == 40
    assert shared.stats().extra["kv_bytes"] == 2 * shared.n_layer * 64 * shared.n_head_kv * shared.head_dim * 4
    for b in (shared, copying):
        b.truncate(12)  # positions 12.. are overwritten, never read
    same([tokens[30:35], [tokens[0]], [tokens[1]]])
    for b in (shared, copying):
        b.truncate(0)
    same([tokens[5:9], [tokens[2]]])
    assert shared.capacity == 64  # a reset keeps the buffers
    shared.close()
    copying.close()


@pytest.mark.parametrize("name", ["smollm", "llama"])
def test_protocol_and_tokenizer(name, exported):
    from transformers import AutoTokenizer

    backend = OnnxBackend(exported[name]["fp32"], threads=1)
    assert isinstance(backend, Backend)
    assert backend.name == "onnxruntime" and backend.n_ctx == 512 and backend.chat_template
    hf = AutoTokenizer.from_pretrained(exported[name]["src"])
    text = VARIED_TEXT
    assert backend.tokenize(text, add_special=True, parse_special=True) == hf(text)["input_ids"]
    plain = backend.tokenize(text, add_special=False, parse_special=False)
    decoded = backend.detokenize(plain).decode("utf-8")
    if name == "llama":  # SentencePiece adds a space before the text ("▁" prefix), as llama.cpp's pieces show it
        decoded = decoded.removeprefix(" ")
    assert decoded == text
    # detokenize is bytes, piece by piece: a character split across tokens is whole once joined
    pieces = b"".join(backend.detokenize([t]) for t in plain)
    assert pieces == backend.detokenize(plain)
    if name == "smollm":  # the tiny SentencePiece vocabulary has no chat-markup tokens
        im_start = backend.tokenize("<|im_start|>", add_special=False, parse_special=True)
        assert len(im_start) == 1 and len(backend.tokenize("<|im_start|>", add_special=False)) > 1
    assert backend.eog_ids and all(0 <= t < backend.n_vocab for t in backend.eog_ids)


def test_cache_truncate_and_batched_prefill(exported, monkeypatch):
    backend = OnnxBackend(exported["smollm"]["int4"], threads=1)
    prompt = backend.tokenize(" ".join(corpus()[:20]))[:60]
    backend.set_sampling(GREEDY)
    first = backend.step(prompt)
    logits_one_run = backend.logits()
    generated = [first]
    for _ in range(5):
        generated.append(backend.step([generated[-1]]))
    assert backend.n_past == len(prompt) + 5 and backend.history[:len(prompt)] == prompt
    backend.truncate(len(prompt))  # back to just after the prompt: the same continuation again
    again = [backend.step([first])]
    for _ in range(4):
        again.append(backend.step([again[-1]]))
    assert again == generated[1:]
    with pytest.raises(OptionError):
        backend.truncate(backend.n_past + 1)

    monkeypatch.setattr(onnxrt, "N_BATCH", 7)  # the prompt in 9 runs through the cache
    backend.truncate(0)
    assert backend.step(prompt) == first
    assert np.abs(backend.logits() - logits_one_run).max() < 1e-4
    stats = backend.stats()
    assert stats.n_past == len(prompt) and stats.extra["kv_bytes"] > 0 and stats.weights_bytes > 0
    backend.close()


def test_sampling_is_seeded_and_context_is_enforced(exported):
    backend = OnnxBackend(exported["llama"]["int4"], n_ctx=40, threads=1, memory_budget=256 << 20)
    prompt = backend.tokenize("def fib(n):")

    def draw(seed):
        backend.truncate(0)
        backend.set_sampling(Sampling(temperature=1.0, seed=seed))
        out = [backend.step(prompt)]
        for _ in range(8):
            out.append(backend.step([out[-1]]))
        return out

    assert draw(3) == draw(3)
    assert draw(3) != draw(4) or draw(3) != draw(5)
    with pytest.raises(OptionError, match="context is full"):
        backend.step(list(range(3, 40)))
    with pytest.raises(OptionError, match="outside the vocabulary"):
        backend.truncate(0) or backend.step([backend.n_vocab])


def test_can_run_and_bad_folders(exported, tmp_path):
    assert OnnxBackend.can_run(exported["llama"]["fp32"]) is None
    assert OnnxBackend.can_run(exported["llama"]["fp32"] / "model.onnx") is None
    assert "no model.onnx" in OnnxBackend.can_run(tmp_path)
    with pytest.raises(CheckpointError, match="no model.onnx"):
        OnnxBackend(tmp_path)
    with pytest.raises(OptionError, match="n_ctx must be a whole number in 1..512"):
        OnnxBackend(exported["llama"]["fp32"], n_ctx=100000)
    with pytest.raises(OptionError, match="q8_0 KV cache is for the native and llama.cpp backends"):
        OnnxBackend(exported["llama"]["fp32"], kv_cache="q8_0")


def test_eval_on_onnx(exported, tmp_path):
    from typer.testing import CliRunner

    from edgeai.cli import app

    text = tmp_path / "text.txt"
    text.write_text("\n".join(corpus()[:300]), encoding="utf-8")
    src = exported["smollm"]["src"]
    runs = {}
    for kind in ("fp32", "int4"):
        result = CliRunner().invoke(app, ["eval", str(exported["smollm"][kind]), "--reference", str(src), "--text",
                                          str(text), "--ctx", "64", "--chunks", "3", "--json", "-t", "1"])
        assert result.exit_code == 0, result.output
        runs[kind] = json.loads(result.output)
    # fp32 in onnxruntime vs the F32 GGUF in llama.cpp: the same model
    assert runs["fp32"]["kld_mean"] < 1e-6 and runs["fp32"]["top1"] == 1.0
    assert abs(runs["fp32"]["ppl"] - runs["fp32"]["ref_ppl"]) < 1e-3 * runs["fp32"]["ref_ppl"]
    assert runs["int4"]["kld_mean"] > 1e-4 and 4.0 < runs["int4"]["bpw"] < 6.0
    assert runs["int4"]["size_bytes"] < runs["fp32"]["size_bytes"] / 3


def test_onnxruntime_genai_runs_the_folder(exported):
    """genai_config.json is enough for onnxruntime-genai: its greedy tokens equal ours (the package is a
    test dependency only; skipped where it has no wheel for the platform)."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai has no wheel for this platform")
    folder = exported["smollm"]["int4"]
    model = og.Model(str(folder))
    ids = [int(t) for t in og.Tokenizer(model).encode("def fib(n):")]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 10, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    backend = OnnxBackend(folder, threads=1)
    assert ids == backend.tokenize("def fib(n):")
    ours = [backend.step(ids)]
    while len(ours) < len(theirs):
        ours.append(backend.step([ours[-1]]))
    assert ours == theirs
