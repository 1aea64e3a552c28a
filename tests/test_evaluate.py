"""The evaluator: llama.cpp's logits, llama-perplexity's chunking, checked against transformers."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import edgeai
from edgeai.cli import app
from edgeai.errors import OptionError
from edgeai.evaluate import EvalResult, evaluate
from helpers import TINY_ARCHS, corpus, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}
N_CTX = 64
N_CHUNKS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 checkpoint, its F32 and Q8_0 GGUFs, and a text of ~70k tokens.

    The text leaves out chat markup: llama-perplexity tokenizes special tokens as plain text,
    transformers parses them, and the transformers check below must see the same tokens.
    """
    root = tmp_path_factory.mktemp("eval")
    folder = make_tiny_checkpoint(root / "qwen2", ARCHS["qwen2"])
    text = root / "text.txt"
    text.write_text("\n".join(line for line in corpus() if "<|" not in line), encoding="utf-8")
    return {
        "folder": folder,
        "f32": edgeai.convert(folder, root / "f32.gguf", outtype="f32"),
        "q8_0": edgeai.convert(folder, root / "q8_0.gguf", outtype="q8_0"),
        "text": text,
    }


def test_model_against_itself(tiny):
    r = evaluate(tiny["f32"], tiny["f32"], tiny["text"], n_ctx=N_CTX, n_chunks=N_CHUNKS, threads=1)
    assert abs(r.kld_mean) < 1e-6 and abs(r.kld_p99) < 1e-6
    assert r.top1 == 1.0
    assert r.ppl == r.ref_ppl
    assert r.n_chunks == N_CHUNKS and r.n_tokens == N_CHUNKS * (N_CTX - N_CTX // 2 - 1)
    assert r.size_bytes == tiny["f32"].stat().st_size
    assert 31.9 < r.bpw <= 32.0


def test_q8_0_against_f32(tiny):
    r = evaluate(tiny["q8_0"], tiny["f32"], tiny["text"], n_ctx=N_CTX, n_chunks=N_CHUNKS, threads=1)
    assert 0 < r.kld_median <= r.kld_p99 and 0 < r.kld_mean < 1e-2
    assert abs(r.ppl / r.ref_ppl - 1) < 1e-2
    assert 0.8 < r.top1 < 1.0
    assert 8.5 <= r.bpw < 9.5  # Q8_0 is 8.5; the F32 norms add a little
    assert r.size_bytes < tiny["f32"].stat().st_size / 3


def test_native_backend_and_kv_cache(tiny):
    """backend="native" scores the artifact in edgeai's engine (the reference stays llama.cpp's, F32
    cache): the F32 file against itself differs only by the engine's f16 cache; kv_cache names are
    checked as everywhere (this model's heads of 16 take no quantized cache)."""
    r = evaluate(tiny["f32"], tiny["f32"], tiny["text"], n_ctx=N_CTX, n_chunks=2, threads=1, backend="native",
                 kv_cache="f16")
    assert 0 <= r.kld_mean < 1e-4 and abs(r.ppl / r.ref_ppl - 1) < 1e-3 and r.top1 > 0.97
    with pytest.raises(OptionError, match="'q5_0' is not one of f16, q8_0, q4_0"):
        evaluate(tiny["f32"], tiny["f32"], tiny["text"], n_ctx=N_CTX, n_chunks=1, backend="native", kv_cache="q5_0")
    with pytest.raises(OptionError, match="a q4_0 KV cache needs a head size that is a multiple of 32"):
        evaluate(tiny["f32"], tiny["f32"], tiny["text"], n_ctx=N_CTX, n_chunks=1, backend="native", kv_cache="q4_0")
    with pytest.raises(OptionError, match="backend 'onnxruntime' is not one of llama.cpp, native"):
        evaluate(tiny["f32"], tiny["f32"], tiny["text"], n_ctx=N_CTX, n_chunks=1, backend="onnxruntime")


def test_reference_as_hf_folder(tiny):
    """The folder is converted to F32 in a temporary directory: the same numbers as the F32 file."""
    from_folder = evaluate(tiny["q8_0"], tiny["folder"], tiny["text"], n_ctx=N_CTX, n_chunks=N_CHUNKS, threads=1)
    from_file = evaluate(tiny["q8_0"], tiny["f32"], tiny["text"], n_ctx=N_CTX, n_chunks=N_CHUNKS, threads=1)
    assert from_folder.ref_ppl == from_file.ref_ppl and from_folder.kld_mean == from_file.kld_mean
    assert from_folder.reference == str(tiny["folder"])


def _transformers_ppl(folder, text: str, add_bos: bool, first: int, shift: int = 1) -> float:
    """llama-perplexity's scoring written out independently, on transformers' logits: chunks of N_CTX
    tokens (first token set to BOS if the model adds one), logits[j] for j in [first, N_CTX-1)
    predict chunk[j + shift] (shift=1 is right; other values exist to show the check can fail)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        ids = [tok.bos_token_id] + ids
    chunks = np.array(ids[: N_CHUNKS * N_CTX]).reshape(N_CHUNKS, N_CTX)
    if add_bos:
        chunks[:, 0] = tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(chunks)).logits.double(), dim=-1).numpy()
    rows = np.arange(first, N_CTX - 1)
    targets = chunks[:, np.minimum(rows + shift, N_CTX - 1)]
    nll = -np.take_along_axis(logp[:, rows], targets[..., None], axis=-1)
    return math.exp(nll.mean())


@pytest.mark.parametrize("add_bos", [False, True])
def test_ppl_matches_transformers(tiny, tmp_path, add_bos):
    folder = tiny["folder"]
    if add_bos:  # the same model, with a tokenizer that starts every text with BOS
        folder = shutil.copytree(folder, tmp_path / "with_bos")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    f32 = edgeai.convert(folder, tmp_path / "f32.gguf", outtype="f32")
    ours = evaluate(f32, f32, tiny["text"], n_ctx=N_CTX, n_chunks=N_CHUNKS, threads=1).ppl

    text = tiny["text"].read_text(encoding="utf-8")
    theirs = _transformers_ppl(folder, text, add_bos, first=N_CTX // 2)
    assert abs(ours / theirs - 1) < 1e-3, (ours, theirs)
    # the check is sharp: scoring the whole chunk, or off by one, lands outside the tolerance
    for wrong in (_transformers_ppl(folder, text, add_bos, first=0),
                  _transformers_ppl(folder, text, add_bos, first=N_CTX // 2, shift=0),
                  _transformers_ppl(folder, text, not add_bos, first=N_CTX // 2)):
        assert abs(ours / wrong - 1) > 1e-3, (ours, wrong)


def test_cli_json(tiny):
    result = CliRunner().invoke(app, ["eval", str(tiny["q8_0"]), "--reference", str(tiny["f32"]), "--text",
                                      str(tiny["text"]), "--ctx", str(N_CTX), "--chunks", "4", "--threads", "1",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # exactly one object: json.loads refuses trailing text
    assert {"ppl", "ref_ppl", "kld_mean", "kld_p99", "top1", "size_bytes", "bpw"} <= set(data)
    assert set(data) == set(EvalResult.__dataclass_fields__)
    assert data["n_chunks"] == 4 and data["size_bytes"] == tiny["q8_0"].stat().st_size


def test_cli_table(tiny):
    result = CliRunner().invoke(app, ["eval", str(tiny["q8_0"]), "-r", str(tiny["f32"]), "--text", str(tiny["text"]),
                                      "--ctx", str(N_CTX), "--chunks", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for expected in ("perplexity", "reference perplexity", "KLD mean", "KLD p99", "top-1", "MiB", "bits per weight"):
        assert expected in result.stdout, expected


def test_text_too_short(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("def fib(n): return n")
    with pytest.raises(OptionError, match=r"short\.txt is too short: \d+ tokens .* needs n_ctx = 64"):
        evaluate(tiny["q8_0"], tiny["f32"], short, n_ctx=N_CTX)
    result = CliRunner().invoke(app, ["eval", str(tiny["q8_0"]), "-r", str(tiny["f32"]), "--text", str(short),
                                      "--ctx", str(N_CTX)])
    assert result.exit_code == 1 and "too short" in result.output and "Traceback" not in result.output


def test_missing_paths_are_named(tiny, tmp_path):
    for args in ((tmp_path / "nope.gguf", tiny["f32"], tiny["text"]),
                 (tiny["q8_0"], tmp_path / "nope-ref", tiny["text"]),
                 (tiny["q8_0"], tiny["f32"], tmp_path / "nope.txt")):
        missing = next(a for a in args if not a.exists())
        with pytest.raises(OptionError, match=f"{missing.name} does not exist"):
            evaluate(*args, n_ctx=N_CTX)


def test_different_vocabularies_refused(tiny, tmp_path):
    """Same vocabulary size (400), different tokenizer: KL divergence would compare unrelated tokens."""
    other = make_tiny_checkpoint(tmp_path / "llama", ARCHS["llama"])
    other_f32 = edgeai.convert(other, tmp_path / "llama.gguf", outtype="f32")
    with pytest.raises(OptionError, match="vocabularies differ.*llama.gguf"):
        evaluate(tiny["q8_0"], other_f32, tiny["text"], n_ctx=N_CTX, n_chunks=1)
