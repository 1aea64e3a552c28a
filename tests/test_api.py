"""The Python API as an app uses it: load, chat, budgets, devices, and bad input."""

from __future__ import annotations

import logging

import pytest

import edgeai
from edgeai.budget import parse_budget
from edgeai.devices import get_profile, profiles
from edgeai.devices.cores import allowed_cpus
from edgeai.errors import (BackendError, ChatTemplateError, CheckpointError, ContextOverflowError, DeviceError,
                           OptionError)
from edgeai.model import FinishReason, Model

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
def model(tiny_chat_gguf):
    with edgeai.load(tiny_chat_gguf, n_ctx=256, threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def shared_model(tiny_chat_gguf):
    """One load for tests that only swap the chat template (each builds its own Model on the backend)."""
    with edgeai.load(tiny_chat_gguf, n_ctx=256, threads=1) as m:
        yield m


def test_auto_picks_llama_cpp_for_gguf_and_the_default_model_loads():
    with edgeai.load(n_ctx=512, threads=1) as m:  # the bundled SmolLM2
        assert m.backend.name in ("native", "llama.cpp")
        answer = m.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=8, temperature=0)
        assert answer.strip() and m.backend.n_past > 8


def test_chat_template_matches_transformers(model, tiny_chat_gguf):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_chat_gguf.parent / "hf")
    assert model.render_chat(MSGS) == hf.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    tokens = model.chat_tokens(MSGS)
    assert tokens[0] == model.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]


def test_chat_turns_reuse_the_cache_and_equal_a_fresh_run(model):
    answer = model.chat(MSGS, max_tokens=6, temperature=0)
    convo = MSGS + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    second = list(model.chat(convo, stream=True, max_tokens=6, temperature=0))
    t = second[-1].timings
    assert t.cached_tokens >= len(model.chat_tokens(MSGS)) and t.prompt_tokens < t.cached_tokens
    model.reset()
    fresh = list(model.chat(convo, stream=True, max_tokens=6, temperature=0))
    assert [c.token for c in fresh] == [c.token for c in second] and fresh[-1].timings.cached_tokens == 0


def test_broken_chat_templates_fall_back_with_a_warning(model, caplog):
    be = model.backend
    with caplog.at_level(logging.WARNING):
        be.chat_template = "{% for m in messages %}"  # does not compile
        plain = Model(be)
        assert plain.plain_chat and "warning" not in plain.render_chat(MSGS)
        assert plain.render_chat(MSGS).endswith("user: Hello there, how are you?\n\nassistant:")
        assert "does not compile" in caplog.text
        be.chat_template = "{{ messages[0]['content'] | no_such_filter_at_runtime if false else messages.nope.deeper }}"
        failing = Model(be)  # a bug met while rendering: the plain template from then on
        assert failing.render_chat(MSGS).startswith("system: Be brief.")
        assert "failed to render" in caplog.text and failing.plain_chat


def test_a_template_refusing_the_conversation_is_an_error_for_that_call(model):
    """raise_exception(...) stops the call with the template's words, as in transformers and llama.cpp;
    the template stays in use for the next conversation."""
    be = model.backend
    be.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    m = Model(be)
    with pytest.raises(ChatTemplateError, match=f"chat template of {be.path.name} refused this conversation: "
                                                "System role not supported"):
        m.chat(MSGS, max_tokens=2)
    assert not m.plain_chat and m.render_chat(MSGS[1:]) == "[Hello there, how are you?]"


@pytest.mark.parametrize("source,message", [
    ("{{ raise_exception.__globals__ }}", "sandbox: access to attribute '__globals__'"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox: access to attribute '__class__'"),
    ("{{ cycler.__init__.__globals__.os }}", "sandbox: access to attribute '__init__'"),
    ("{{ messages.append({'role': 'x'}) }}", "sandbox: access to attribute 'append'"),
    ("{{ 'x' * 300000000 }}", "repeats a value of 1 characters .* 300,000,000 times"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "builds a value of 16,777,216 characters"),
    ("{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "joins values of 8,388,608 and 8,388,608"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "runs more than 1,000,000 loop iterations"),
    ("{% for i in range(20000) %}{% for j in range(100) %}0123456789{% endfor %}{% endfor %}",
     "writes more than 8,388,608 characters"),
    ("{{ 'x'|center(1000000000) }}", "passes 1,000,000,000 to the filter 'center'"),
    ("{{ 'x'.ljust(1000000000) }}", "passes 1,000,000,000 to ljust()"),
    ("{{ '%0999999999d' % 1 }}", "width or precision of 999,999,999"),
    ("{{ '{:>999999999}'.format(1) }}", "width or precision of 999,999,999"),
    ("{{ range(100000)|join('x' * 100000) }}", "filter 'join' on values of 100,000 and 100,000"),
    ("{{ ('x' * 100000).replace('', 'y' * 100000) }}", "replace\\(\\) on values of 100,000 and 100,000"),
    ("{{ ([[0] * 1000] * 100000)|sum(start=[]) }}", "filter 'sum' on a value holding 100,100,000"),
    ("{{ 7 ** 1000000 }}", "raises 7 to the power 1,000,000"),
    ("{{ (range(100000)|list)|tojson(indent=1000) }}", "indents 100,000 items by 1,000 in tojson"),
    ("{% macro f(n) %}{{ f(n) ~ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
])
def test_hostile_chat_templates_are_refused_quickly(shared_model, source, message):
    """Each of these used to reach Python's internals, or run for minutes into gigabytes."""
    import time

    be = shared_model.backend
    be.chat_template = source
    m = Model(be)
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=f"chat template of {be.path.name} .*{message}"):
        m.render_chat(MSGS)
    assert time.perf_counter() - t0 < 3 and not m.plain_chat


def test_chat_templates_are_bounded_in_time(model, monkeypatch):
    """Work that no size bound catches (2^40 macro calls, each small) stops at the wall-time bound."""
    import time

    import edgeai.chat_template as ct

    monkeypatch.setattr(ct, "MAX_SECONDS", 0.3)
    be = model.backend
    be.chat_template = "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}"
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="ran longer than 0.3 s"):
        Model(be).render_chat(MSGS)
    assert time.perf_counter() - t0 < 2


def test_fit_messages_drops_the_oldest_turns(model):
    long_turns = [{"role": "system", "content": "Be brief."}]
    for i in range(12):
        long_turns += [{"role": "user", "content": f"question {i} " * 6}, {"role": "assistant", "content": "answer " * 6}]
    long_turns.append({"role": "user", "content": "last one"})
    kept, dropped = model.fit_messages(long_turns, reserve=64)
    assert dropped > 0 and kept[0]["role"] == "system" and kept[-1]["content"] == "last one"
    assert kept[1]["role"] == "user" and dropped % 2 == 0  # whole turns go
    assert len(model.chat_tokens(kept)) + 64 <= model.n_ctx
    with pytest.raises(ContextOverflowError):
        model.fit_messages([{"role": "user", "content": "word " * 400}], reserve=16)
    assert model.chat(kept, max_tokens=3, temperature=0) is not None


def test_generation_options(model):
    chunks = list(model.stream("Hello", max_tokens=3, temperature=0))
    assert len(chunks) == 3 and chunks[-1].finish_reason is FinishReason.LENGTH
    assert all(c.timings.prompt_seconds > 0 for c in chunks)
    with pytest.raises(OptionError, match="unknown sampling option 'temp'"):
        model.generate("Hello", temp=0.5)
    with pytest.raises(OptionError, match="top_p"):
        model.generate("Hello", top_p=0)
    with pytest.raises(OptionError, match="max_tokens"):
        model.generate("Hello", max_tokens=0)
    with pytest.raises(OptionError, match="message 1"):
        model.chat([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])


def test_bad_paths_and_backends(tmp_path, tiny_chat_gguf):
    with pytest.raises(CheckpointError, match="does not exist"):
        edgeai.load(tmp_path / "missing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(CheckpointError, match=r"not a model edgeai can run: it is a 18-byte file starting with b'hello, n'"):
        edgeai.load(text)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="a folder holding config.json"):
        edgeai.load(tmp_path / "folder")
    with pytest.raises(OptionError, match="unknown backend 'tensorrt'; choose one of auto, native, llama.cpp"):
        edgeai.load(tiny_chat_gguf, backend="tensorrt")
    with pytest.raises(BackendError, match="backend onnxruntime cannot run .*--backend native or llama.cpp"):
        edgeai.load(tiny_chat_gguf, backend="onnxruntime")


def test_budgets():
    assert parse_budget("1.5GiB") == 3 * 2**29
    assert parse_budget("800MB") == 800_000_000
    assert parse_budget("800 mb") == 800_000_000
    assert parse_budget("60%", total_memory=2**33) == int(0.6 * 2**33)
    assert parse_budget(2**30) == 2**30 and parse_budget(None) is None
    for bad, why in [("lots", "not a size"), ("10XB", "unknown unit 'XB'"), ("0%", r"\(0, 100\]"),
                     ("150%", r"\(0, 100\]"), ("800", "did you forget the unit"), ("-1GB", "not a size")]:
        with pytest.raises(OptionError, match=why):
            parse_budget(bad)
    with pytest.raises(OptionError, match="more than the device's"):
        parse_budget("9GiB", total_memory=8 * 2**30)


def test_device_profiles_have_sources_and_set_threads_and_budget(tiny_chat_gguf):
    table = profiles()
    for name in ("pi4-4gb", "pi4-8gb", "pi5-8gb-sd", "pi5-8gb-nvme", "pi5-16gb-sd", "pi5-16gb-nvme", "m1-8gb",
                 "m1-16gb", "m2-24gb", "m3-8gb", "m4-24gb", "x86-avx2-8gb", "x86-avx2-16gb", "x86-avx512-16gb"):
        p = table[name]
        assert 0 < p.decode_bandwidth < p.memory_bandwidth and p.storage_read > 0 and p.threads >= 1 and 0 < p.default_budget < p.memory_bytes
        for figure in ("cpu", "isa", "memory", "memory_bandwidth_gbs", "decode_bandwidth_fraction", "storage_read_gbs",
                       "os_reserve_gb"):
            assert len(p.sources[figure]) > 20, (name, figure)
    with pytest.raises(DeviceError, match="unknown device 'pi9'; known devices: m1-8gb, .*pi4-4gb"):
        get_profile("pi9")
    pi = get_profile("pi5-8gb-nvme")
    with edgeai.load(tiny_chat_gguf, device="pi5-8gb-nvme", n_ctx=64) as m:
        # the profile's 4 threads, or as many CPUs as this process may use if fewer
        assert pi.threads == 4 and m.backend.stats().threads == min(4, len(allowed_cpus()))
        assert m.memory_budget == pi.default_budget and m.device is pi
    with edgeai.load(tiny_chat_gguf, device="pi4-4gb", memory_budget="50%", n_ctx=64) as m:
        assert m.memory_budget == 2 * 2**30
    with pytest.raises(DeviceError, match="unknown device"):
        edgeai.load(tiny_chat_gguf, device="cray-1")
