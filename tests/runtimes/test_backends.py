"""The interface every backend passes, run against each registered backend.

Adding a backend is one entry in ARTIFACTS: its registry name -> the name of a fixture that
builds an artifact of the tiny chat model (tests/conftest.py) in the form that backend runs.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgeai
from edgeai.errors import ContextOverflowError, EdgeAIError
from edgeai.model import FinishReason
from edgeai.runtimes.base import Backend, Sampling
from edgeai.runtimes.sampling import apply_repeat_penalty, candidates, make_rng, sample
from helpers import VARIED_TEXT

ARTIFACTS = {
    "llama.cpp": "tiny_chat_gguf",
    "native": "tiny_chat_gguf",
    "onnxruntime": "tiny_chat_onnx",
}

PROMPT = "def fib(n):\n    return n if n < 2 else"


@pytest.fixture(params=list(ARTIFACTS))
def backend_name(request):
    return request.param


@pytest.fixture
def artifact(request, backend_name):
    return request.getfixturevalue(ARTIFACTS[backend_name])


@pytest.fixture
def model(artifact, backend_name):
    with edgeai.load(artifact, backend=backend_name, n_ctx=128, threads=1) as m:
        yield m


def test_protocol(model, backend_name, artifact):
    be = model.backend
    assert isinstance(be, Backend)
    assert be.name == backend_name and type(be).can_run(artifact) is None
    assert be.n_ctx == 128 and be.n_vocab > 300 and be.n_past == 0 and be.history == []
    assert be.eos_id in be.eog_ids and be.bos_id is not None
    assert "<|im_start|>" in be.chat_template
    stats = be.stats()
    assert stats.backend == backend_name and stats.n_ctx == 128 and stats.weights_bytes > 0 and stats.threads == 1


def test_tokenize_round_trip(model):
    tokens = model.tokenize(VARIED_TEXT, add_special=False)
    assert model.detokenize(tokens).decode("utf-8") == VARIED_TEXT
    assert model.tokenize("<|im_start|>", add_special=False, parse_special=True) == [
        model.tokenize("<|im_start|>x", add_special=False, parse_special=True)[0]]
    assert len(model.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1


def test_greedy_is_deterministic_and_is_the_argmax(model):
    chunks = list(model.stream(PROMPT, max_tokens=12, temperature=0))
    again = list(model.stream(PROMPT, max_tokens=12, temperature=0))
    assert [c.token for c in chunks] == [c.token for c in again]
    assert chunks[-1].finish_reason is FinishReason.LENGTH and len(chunks) == 12
    # the same loop by hand over `step`: every token is the arg-max of the backend's logits
    model.reset()
    model.backend.set_sampling(Sampling(temperature=0))
    pending, manual = model.tokenize(PROMPT), []
    for _ in range(12):
        tok = model.step(pending)
        assert tok == int(np.argmax(model.backend.logits()))
        manual.append(tok)
        pending = [tok]
    assert manual == [c.token for c in chunks]


def test_sampling_follows_the_reference_sampler(model):
    """Backends that sample in Python use the shared sampler draw for draw; the native engine
    samples in C++ with its own generator, so there each draw must lie in the reference candidate
    set (its distribution is checked in test_native_engine.py)."""
    s = Sampling(temperature=1.3, top_k=50, top_p=0.9, min_p=0.01, repeat_penalty=1.2, seed=11)
    be = model.backend
    be.set_sampling(s)
    prompt = model.tokenize(PROMPT)
    tok = be.step(prompt)
    if be.name == "native":
        ids, _ = candidates(apply_repeat_penalty(be.logits(), be.history, s), s)
        draws = {tok}
        for _ in range(30):
            be.truncate(len(prompt) - 1)
            draws.add(be.step(prompt[-1:]))
        assert draws <= set(ids.tolist()) and len(draws) > 1
    else:
        assert tok == sample(be.logits(), be.history, s, make_rng(s))


def test_seed_reproducibility(model):
    a = model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7)
    b = model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7)
    c = model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=8)
    assert a == b and a != c


def test_stop_strings(model):
    text = model.generate(PROMPT, max_tokens=24, temperature=0)
    assert len(text) > 12
    stop = text[6:10]
    cut = text[:text.find(stop)]
    chunks = list(model.stream(PROMPT, max_tokens=24, temperature=0, stop=["never-there", stop]))
    assert "".join(c.text for c in chunks) == cut
    assert chunks[-1].finish_reason is FinishReason.STOP


def test_stream_text_is_the_incremental_utf8_decoding(model):
    chunks = list(model.stream(PROMPT, max_tokens=20, temperature=0))
    last = model.tokenize(PROMPT)[-1:]
    whole = model.detokenize(last + [c.token for c in chunks])[len(model.detokenize(last)):]
    assert "".join(c.text for c in chunks) == whole.decode("utf-8", errors="replace")


def test_truncate_and_prefix_reuse_equal_a_fresh_evaluation(model):
    be = model.backend
    be.set_sampling(Sampling(temperature=0))
    tokens = model.tokenize(VARIED_TEXT)[:60]
    be.step(tokens)
    fresh = be.logits()
    be.truncate(25)
    assert be.n_past == 25 and be.history == tokens[:25]
    be.step(tokens[25:])
    np.testing.assert_allclose(be.logits(), fresh, atol=2e-3 * float(np.abs(fresh).max()))
    assert be.history == tokens
    # through the API: the second prompt reuses the first one's cache and gives the fresh answer
    first = list(model.stream(tokens[:40], max_tokens=4, temperature=0))
    reused = list(model.stream(tokens, max_tokens=8, temperature=0))
    assert reused[-1].timings.cached_tokens == 40 and reused[-1].timings.prompt_tokens == 20
    model.reset()
    fresh_run = list(model.stream(tokens, max_tokens=8, temperature=0))
    assert fresh_run[-1].timings.cached_tokens == 0
    assert [c.token for c in reused] == [c.token for c in fresh_run]
    assert first[0].timings.generated_tokens == 1


def test_context_limits(model):
    with pytest.raises(ContextOverflowError, match="context holds 128"):
        model.generate(model.tokenize(VARIED_TEXT * 3), max_tokens=4)
    prompt = model.tokenize(VARIED_TEXT)[:120]
    chunks = list(model.stream(prompt, max_tokens=50, temperature=0))
    assert chunks[-1].finish_reason is FinishReason.CONTEXT
    assert model.backend.n_past == 128


def test_close_is_idempotent_and_final(artifact, backend_name):
    m = edgeai.load(artifact, backend=backend_name, n_ctx=64, threads=1)
    m.close()
    m.close()
    with pytest.raises(EdgeAIError, match="closed"):
        m.generate("hello", max_tokens=2)
