"""Structured output (grammar, JSON Schema, regex, response_format), forced tokens, tool calls and
thinking sections: every answer is checked by an engine no one here wrote (`jsonschema`, `re`)."""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import numpy as np
import pytest

import edgeai
from edgeai.constraints import ConstraintError, Matcher, constraint_from
from edgeai.errors import OptionError
from edgeai.model import FinishReason
from edgeai.paths import default_model_path
from edgeai.tools import ThinkSplit

# Schemas for the tests (the benchmark has its own 50). Strings and arrays are bounded so that a
# random tiny model, which samples anything the grammar allows, finishes within max_tokens.
TINY_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "bird"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["kind", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -50, "maximum": 50}, "y": {"type": "integer", "minimum": -50, "maximum": 50}},
        "required": ["x", "y"], "additionalProperties": False},
        "ok": {"type": "boolean"}}, "required": ["point", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    # (not "date": its RFC 3339 grammar allows year 0000, which Python's date, jsonschema's checker, refuses)
    {"type": "object", "properties": {"who": {"type": "string", "format": "email", "maxLength": 12},
                                      "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["who"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                                      "note": {"type": "string", "maxLength": 6}},
     "required": ["code"], "additionalProperties": False},
]

# The real model: nested objects, arrays with min/max items, enums, integer and number ranges,
# string patterns and formats, optional and required keys.
SMOLLM2_CASES = [
    ("Describe a person named Alice, 31 years old, as JSON.",
     {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                       "email": {"type": "string", "format": "email"}},
      "required": ["name", "age"], "additionalProperties": False}),
    ("Give a shopping list of 2 to 4 fruits with prices as JSON.",
     {"type": "object", "properties": {"items": {"type": "array", "minItems": 2, "maxItems": 4, "items": {
         "type": "object", "properties": {"fruit": {"type": "string", "maxLength": 20},
                                          "price": {"type": "number", "minimum": 0, "maximum": 100}},
         "required": ["fruit", "price"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False}),
    ("Classify the sentence 'I love this phone' as JSON.",
     {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
      "required": ["sentiment", "confidence"], "additionalProperties": False}),
    ("Give a flight booking as JSON.",
     {"type": "object", "properties": {"flight": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,4}$"},
                                       "date": {"type": "string", "format": "date"},
                                       "passenger": {"type": "object", "properties": {
                                           "first": {"type": "string", "maxLength": 20}, "last": {"type": "string", "maxLength": 20}},
                                           "required": ["first", "last"], "additionalProperties": False}},
      "required": ["flight", "date", "passenger"], "additionalProperties": False}),
]


def _check(reply, schema):
    assert not reply.incomplete, (reply.finish_reason, str(reply))
    jsonschema.validate(json.loads(reply), schema, format_checker=jsonschema.FormatChecker())


# -- bad input: refused before any token, naming the position or rule --------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"grammar": 'root ::= "a" b\n'}, "Rule 'b' not found"),
    ({"grammar": 'root ::= "a" ( "b" \n'}, r"Expected '\)' at line 2"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "Invalid type: strin"),
    ({"json_schema": {"type": "object", "unevaluatedProperties": False}}, "Unimplemented keys.*unevaluatedProperties"),
    ({"json_schema": {"type": "string", "format": "hostname-weird"}}, "Unknown format: hostname-weird"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"regex": "a", "grammar": 'root ::= "a"'}, "give one of"),
    ({"response_format": {"type": "xml"}}, "not one of text, json_object, json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs"),
])
def test_bad_constraints_are_refused_by_name(options, message):
    with pytest.raises(ConstraintError, match=message):
        constraint_from(**options)


def test_a_bad_schema_fails_before_the_model_runs(tiny_chat_gguf):
    with edgeai.load(tiny_chat_gguf, backend="native", threads=1) as m:
        with pytest.raises(ConstraintError, match="Invalid type"):
            m.stream("hi", json_schema={"type": "strin"})
        with pytest.raises(ConstraintError, match="cannot be combined"):
            m.chat([{"role": "user", "content": "hi"}], regex="a", tools=[_weather_tool()])
        assert m.backend.n_past == 0


# -- every backend: the output parses and validates --------------------------------------------------------
@pytest.mark.parametrize("backend", ["native", "llama.cpp", "onnxruntime"])
def test_every_backend_follows_schemas_grammars_and_regexes(tiny_chat_gguf, tiny_chat_onnx, backend):
    path = tiny_chat_onnx if backend == "onnxruntime" else tiny_chat_gguf
    with edgeai.load(path, backend=backend, threads=1, n_ctx=512) as m:
        for i, schema in enumerate(TINY_SCHEMAS):
            _check(m.generate("Data:", json_schema=schema, max_tokens=300, seed=i, temperature=1.0), schema)
        r = m.generate("x", response_format={"type": "json_object"}, max_tokens=300, seed=1, temperature=0.7)
        assert r.incomplete or isinstance(json.loads(r), dict)  # any object: it may be cut short, never invalid
        r = m.generate("Code:", regex=r"[a-z]{3}-[0-9]{2,4}", max_tokens=40, seed=2, temperature=1.0)
        assert re.fullmatch(r"[a-z]{3}-[0-9]{2,4}", r) and r.finish_reason is FinishReason.STOP
        gbnf = 'root ::= "The answer is " answer "."\nanswer ::= ("yes" | "no" | [0-9]+)'
        r = m.generate("Q:", grammar=gbnf, max_tokens=40, seed=3, temperature=1.0)
        assert re.fullmatch(r"The answer is (yes|no|[0-9]+)\.", r), r


@pytest.mark.parametrize("backend", ["native", "llama.cpp"])
def test_smollm2_answers_valid_json(backend):
    with edgeai.load(default_model_path(), backend=backend, n_ctx=1024, threads=1) as m:
        for prompt, schema in SMOLLM2_CASES:
            reply = m.chat([{"role": "user", "content": prompt}], json_schema=schema, max_tokens=200, temperature=0)
            _check(reply, schema)
        reply = m.chat([{"role": "user", "content": "Give a color as JSON."}],
                       response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SMOLLM2_CASES[2][1]}},
                       max_tokens=100, temperature=0)
        _check(reply, SMOLLM2_CASES[2][1])


# -- forced tokens ---------------------------------------------------------------------------------------------
def test_forced_runs_are_batched_and_equal_token_by_token(monkeypatch):
    """Tokens the grammar forces are appended unsampled and evaluated with the next step as one batch;
    the text equals constrained decoding that samples every token (one token allowed: the same one)."""
    prompt, schema = SMOLLM2_CASES[3]
    with edgeai.load(default_model_path(), backend="native", n_ctx=1024) as m:
        steps: list[int] = []
        step = m.backend.step
        monkeypatch.setattr(m.backend, "step", lambda tokens, mask=None, **kw: steps.append(len(tokens)) or step(tokens, mask, **kw))
        chunks = list(m.chat([{"role": "user", "content": prompt}], json_schema=schema, max_tokens=200,
                             temperature=0, stream=True))
        batched = "".join(c.text for c in chunks)
        _check(edgeai.model.Reply.of(iter(chunks)), schema)
        tokens = [c.token for c in chunks if c.token is not None and c.finish_reason is None]
        # one chunk per token, forced ones too (and a closing one without a token when the grammar completes)
        assert len([c for c in chunks if c.token is not None]) == chunks[-1].timings.generated_tokens
        assert max(steps[1:]) > 1 and len(steps) < len(chunks)  # runs evaluated together

        steps.clear()
        monkeypatch.setattr(Matcher, "forced", lambda self, mask: None)
        chunks = list(m.chat([{"role": "user", "content": prompt}], json_schema=schema, max_tokens=200,
                             temperature=0, stream=True))
        assert max(steps[1:]) == 1
        assert "".join(c.text for c in chunks) == batched
        assert [c.token for c in chunks if c.token is not None and c.finish_reason is None] == tokens


def _constrained_runs(m) -> tuple[list[list[int]], dict]:
    """Tokens of constrained generations on `m` (schemas, a regex, greedy and sampled), and how the
    native steps were called: with a mask made during the step ("ahead"), and how many sampled nothing."""
    calls = {"ahead": 0, "unsampled": 0, "masks": 0}
    step = type(m.backend).step

    def counted(self, tokens, mask=None, seq=0, mask_fn=None):
        calls["ahead"] += mask_fn is not None
        calls["masks"] += mask is not None
        tok = step(self, tokens, mask, seq, mask_fn)
        calls["unsampled"] += tok < 0
        return tok

    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(m.backend), "step", counted)
        for i, schema in enumerate(TINY_SCHEMAS[:4]):
            for temperature in (0.0, 1.0):
                chunks = m.stream("Data:", json_schema=schema, max_tokens=300, seed=i, temperature=temperature)
                runs.append([c.token for c in chunks if c.token is not None])
        runs.append([c.token for c in m.stream("Code:", regex=r"[a-z]{3}-[0-9]{2,4}", max_tokens=40, seed=2,
                                               temperature=1.0) if c.token is not None])
    return runs, calls


def test_masks_made_during_the_step_change_no_token(tiny_chat_gguf, monkeypatch):
    """A mask that cannot force a token is made on a worker thread while the step's forward pass runs
    (`MaskAhead`); the tokens are those of masks made before the step, greedy and sampled. Where such
    a mask does force a token after all, the step samples nothing and the token is appended unsampled
    as before (every mask made ahead, to reach that path)."""
    from edgeai.runtimes.native import NativeBackend

    with edgeai.load(tiny_chat_gguf, backend="native", threads=1, n_ctx=512) as m:
        ahead, calls = _constrained_runs(m)
        assert calls["ahead"] > 0 and calls["unsampled"] == 0
        monkeypatch.setattr(NativeBackend, "overlaps_masks", False)
        before, calls = _constrained_runs(m)
        assert calls["ahead"] == 0 and calls["masks"] > 0
        assert ahead == before
        monkeypatch.setattr(NativeBackend, "overlaps_masks", True)
        monkeypatch.setattr(Matcher, "forces_nothing", lambda self: True)
        always, calls = _constrained_runs(m)
        assert calls["unsampled"] > 0  # forced runs after a step that sampled nothing
        assert always == before


def test_a_failure_of_a_mask_made_during_the_step_reaches_the_caller(tiny_chat_gguf, monkeypatch):
    """A constraint error raised on the worker thread is raised by the generation, and the model
    serves the next one as before."""
    import threading

    with edgeai.load(tiny_chat_gguf, backend="native", threads=1, n_ctx=512) as m:
        expected = m.generate("Data:", json_schema=TINY_SCHEMAS[0], max_tokens=300, seed=0, temperature=1.0)
        real = Matcher.mask

        def failing(self):
            if threading.current_thread() is not threading.main_thread():
                raise ConstraintError("the constraint failed: made up for the test")
            return real(self)

        monkeypatch.setattr(Matcher, "mask", failing)
        with pytest.raises(ConstraintError, match="made up for the test"):
            m.generate("Data:", json_schema=TINY_SCHEMAS[0], max_tokens=300, seed=0, temperature=1.0)
        monkeypatch.setattr(Matcher, "mask", real)
        again = m.generate("Data:", json_schema=TINY_SCHEMAS[0], max_tokens=300, seed=0, temperature=1.0)
        assert str(again) == str(expected)
        _check(again, TINY_SCHEMAS[0])


def test_a_step_waits_for_a_mask_made_meanwhile(tiny_chat_gguf):
    """`NativeBackend.step(mask_fn=)`: called after the forward pass; its mask is applied, its None
    samples nothing (-1, the tokens cached); a bad answer or a mask given twice is refused."""
    from edgeai.runtimes.sampling import mask_words

    with edgeai.load(tiny_chat_gguf, backend="native", threads=1, n_ctx=64) as m:
        be = m.backend
        only = mask_words(np.arange(be.n_vocab) == 7)
        seen = []
        assert be.step([1, 2, 3], mask_fn=lambda: seen.append(be.n_past) or only) == 7
        assert seen == [3]  # called once the tokens were evaluated
        assert be.step([7], mask_fn=lambda: None) == -1 and be.n_past == 4
        with pytest.raises(OptionError, match="uint32 words"):
            be.step([7], mask_fn=lambda: [1, 2])
        with pytest.raises(TypeError, match="mask_fn must return None or"):  # the engine's own check
            be._live().step([7], None, 0, lambda: [1, 2])
        with pytest.raises(OptionError, match="a mask or a mask_fn"):
            be.step([7], only, mask_fn=lambda: only)


def test_cut_short_output_is_marked_incomplete(tiny_chat_gguf):
    with edgeai.load(tiny_chat_gguf, backend="native", threads=1) as m:
        r = m.generate("x", json_schema=TINY_SCHEMAS[0], max_tokens=3, seed=0)
        assert r.finish_reason is FinishReason.LENGTH and r.incomplete
        r = m.generate("x", json_schema=TINY_SCHEMAS[0], max_tokens=100, seed=0, stop=['"'])
        assert r.finish_reason is FinishReason.STOP and r.incomplete  # a stop string cut the structure
        r = m.generate("x", max_tokens=3, seed=0)
        assert r.finish_reason is FinishReason.LENGTH and not r.incomplete  # no constraint, nothing to satisfy


def test_a_repeated_constraint_is_compiled_once_and_answers_the_same(tiny_chat_gguf, monkeypatch):
    from edgeai import constraints, model

    compiled = []
    make = constraints.Constraint.matcher
    monkeypatch.setattr(constraints.Constraint, "matcher", lambda self, *a, **k: compiled.append(self.kind) or make(self, *a, **k))
    monkeypatch.setattr(model, "MATCHER_CACHE", 2)
    with edgeai.load(tiny_chat_gguf, backend="native", threads=1) as m:
        first = [m.generate("x", json_schema=TINY_SCHEMAS[0], max_tokens=60, seed=s) for s in range(3)]
        again = [m.generate("x", json_schema=TINY_SCHEMAS[0], max_tokens=60, seed=s) for s in range(3)]
        assert again == first and compiled == ["json_schema"]  # each generation a copy of one compiled matcher
        m.generate("x", regex="[ab]{3}", max_tokens=5)
        m.generate("x", regex="[cd]{3}", max_tokens=5)  # the schema, least recently used, leaves the cache
        m.generate("x", json_schema=TINY_SCHEMAS[0], max_tokens=5)
        assert compiled == ["json_schema", "regex", "regex", "json_schema"]


# -- bounded digits in JSON numbers ------------------------------------------------------------------------------
def _digit_token(m, d: str) -> int:
    ids = m.tokenize(d, add_special=False)
    assert len(ids) == 1, f"{d!r} is not one token here"
    return ids[0]


def _allowed(mask, token: int) -> bool:
    return bool(mask[token >> 5] >> (token & 31) & 1)


def test_json_numbers_take_at_most_json_digits_in_a_row(tiny_chat_gguf):
    """Outside strings a run of digits ends after JSON_DIGITS (the mask drops digit tokens, keeps the
    rest); inside a string digits run on; where the grammar allows nothing but digits they stay;
    rollback and copy carry the count."""
    from edgeai.constraints import JSON_DIGITS, json_schema_constraint

    with edgeai.load(tiny_chat_gguf, backend="native", threads=1) as m:
        tok, eog = m.backend.constraint_tokenizer(), m.backend.eog_ids
        one, zero, dot, quote = (_digit_token(m, c) for c in "10.\"")

        def after(schema, tokens):
            mt = json_schema_constraint(schema).matcher(tok, eog_ids=eog)
            for t in tokens:
                assert _allowed(mt.mask(), t)
                mt.consume(t)
            return mt

        mt = after({"type": "number"}, [one, dot] + [one] * (JSON_DIGITS - 1))
        assert _allowed(mt.mask(), one)  # 15 fraction digits: one more may come
        mt.consume(one)
        mask = mt.mask()
        assert not _allowed(mask, one) and any(_allowed(mask, e) for e in eog)  # 16: the number ends
        twin = mt.copy()
        mt.rollback(1)
        assert _allowed(mt.mask(), one) and not _allowed(twin.mask(), one)

        mt = after({"type": "string"}, [quote] + [one] * (JSON_DIGITS + 4))
        assert _allowed(mt.mask(), one)  # a string's digits are text

        mt = after({"const": 10 ** (JSON_DIGITS + 3)}, [one] + [zero] * (JSON_DIGITS - 1))
        assert _allowed(mt.mask(), zero)  # the schema needs 20 digits: they stay allowed
        mt = after({"type": "integer", "minimum": 10 ** JSON_DIGITS}, [one] + [zero] * JSON_DIGITS)
        mask = mt.mask()  # 17 digits, the least the schema allows: now it may end, so it must
        assert not _allowed(mask, zero) and any(_allowed(mask, e) for e in eog)


def test_a_model_that_repeats_a_digit_still_ends_its_number():
    """SmolLM2 made to pick a digit whenever the grammar allows one (as it did on its own in the
    benchmark: "33.19888..." until max_tokens): the answer ends and validates."""
    schema = {"type": "object", "properties": {"km": {"type": "number", "minimum": 0, "maximum": 100}},
              "required": ["km"], "additionalProperties": False}
    with edgeai.load(default_model_path(), backend="native", n_ctx=512, threads=1) as m:
        eight = _digit_token(m, "8")
        step = m.backend.step

        def digit_loving(tokens, mask=None, mask_fn=None):
            if mask_fn is not None:  # a mask made during the step: seen when the step asks for it
                seen = []
                token = step(tokens, mask_fn=lambda: seen.append(mask_fn()) or seen[0])
                mask = seen[0]
            else:
                token = step(tokens, mask)
            return eight if mask is not None and _allowed(mask, eight) else token

        m.backend.step = digit_loving
        reply = m.generate("How far is it?", json_schema=schema, max_tokens=120, temperature=0)
        _check(reply, schema)
        assert reply.finish_reason is FinishReason.STOP
        assert re.fullmatch(r'\{"km": 8?8\.8{16}\}', str(reply)), str(reply)


# -- tool calls ---------------------------------------------------------------------------------------------------
def _weather_tool():
    return {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 12},
                                                 "unit": {"enum": ["C", "F"]}},
                                                 "required": ["city", "unit"], "additionalProperties": False}}}


def _time_tool():
    return {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


# A Qwen2.5-style template: tools in the system turn, calls as <tool_call> blocks, results as <tool_response>.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    "Call a tool with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{% if not tools %}<|im_start|>system\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A Qwen3-style thinking switch.
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _with_template(tiny_chat_gguf, tmp_path, template: str):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_chat_gguf.parent / "hf", folder)
    (folder / "chat_template.jinja").write_text(template)
    config = json.loads((folder / "config.json").read_text())  # room for the tools block (a 400-token vocabulary
    config["max_position_embeddings"] = 2048                    # spends about a token per character)
    (folder / "config.json").write_text(json.dumps(config))
    return edgeai.convert(folder, tmp_path / "tiny.gguf", outtype="f32")


def _round_trip(m, tools):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    reply = m.chat(msgs, tools=tools, tool_choice="required", max_tokens=120, temperature=0, seed=0)
    assert reply.finish_reason is FinishReason.TOOL_CALLS and not reply.incomplete and str(reply) == ""
    (call,) = reply.tool_calls
    spec = next(t["function"] for t in tools if t["function"]["name"] == call["function"]["name"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), spec["parameters"])
    assert call["id"].startswith("call_") and call["type"] == "function"
    msgs += [reply.message(), {"role": "tool", "tool_call_id": call["id"], "content": "18 C"}]
    text = m.render_chat(msgs, tools=tools)
    assert f'"name": "{call["function"]["name"]}"' in text and "<tool_response>\n18 C\n</tool_response>" in text
    assert text.count("<tool_call>") >= 1 and '"get_time"' in text  # every tool described
    answer = m.chat(msgs, tools=tools, max_tokens=20, temperature=0)  # auto: text or a call, never both
    assert answer.tool_calls or "<tool_call>" not in answer.lstrip()[:11]
    named = m.chat(msgs[:1], tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}},
                   max_tokens=200, temperature=0.9, seed=4)
    assert not named.incomplete
    assert [c["function"]["name"] for c in named.tool_calls] == ["get_time"]
    return text


def test_tool_round_trip_with_the_generic_format():
    """SmolLM2's template knows no tools: they are described in a system message; calls and results
    go back into the conversation as text."""
    with edgeai.load(default_model_path(), backend="native", n_ctx=1024) as m:
        text = _round_trip(m, [_weather_tool(), _time_tool()])
        assert "You can call these tools" in text


def test_tool_round_trip_through_a_template_with_tools(tiny_chat_gguf, tmp_path):
    path = _with_template(tiny_chat_gguf, tmp_path, TOOLS_TEMPLATE)
    with edgeai.load(path, backend="native", threads=1, n_ctx=2048) as m:
        text = _round_trip(m, [_weather_tool(), _time_tool()])
        assert "# Tools\n<tools>" in text and "You can call these tools" not in text
        with pytest.raises(edgeai.errors.OptionError, match="not among tools"):
            m.chat([{"role": "user", "content": "x"}], tools=[_weather_tool()],
                   tool_choice={"type": "function", "function": {"name": "nope"}})
        plain = m.chat([{"role": "user", "content": "x"}], tools=[_weather_tool()], tool_choice="none", max_tokens=5)
        assert plain.tool_calls == []


# -- thinking ----------------------------------------------------------------------------------------------------
def _split_all(split, pieces) -> tuple[str, str]:
    """(thinking, answer) of `pieces` streamed through a ThinkSplit or HarmonySplit, then flushed."""
    got = [split.feed(p) for p in pieces] + [split.flush()]
    return "".join(t for t, _ in got), "".join(a for _, a in got)


@pytest.mark.parametrize("pieces, opened, reasoning, answer", [
    (["<th", "ink>", "let me ", "see</thi", "nk>\n\n", "{\"a\"", ": 1}"], False, "let me see", '{"a": 1}'),
    (["  hello", " there"], False, "", "  hello there"),
    (["deep thought", "</think>", "42"], True, "deep thought", "42"),
    (["never closed"], True, "never closed", ""),
])
def test_thinking_is_split_from_the_answer(pieces, opened, reasoning, answer):
    assert _split_all(ThinkSplit(opened), pieces) == (reasoning, answer)


def test_think_switch_follows_the_template_and_the_constraint_holds(tiny_chat_gguf, tmp_path):
    path = _with_template(tiny_chat_gguf, tmp_path, THINK_TEMPLATE)
    with edgeai.load(path, backend="native", threads=1, n_ctx=512) as m:
        msgs = [{"role": "user", "content": "hi"}]
        assert m.thinks
        assert m.render_chat(msgs, think=False).endswith("<think>\n\n</think>\n\n")
        assert not m.render_chat(msgs, think=True).endswith("</think>\n\n")
        # thinking off: the answer is constrained from its first token
        reply = m.chat(msgs, think=False, json_schema=TINY_SCHEMAS[0], max_tokens=200, seed=1, temperature=1.0)
        _check(reply, TINY_SCHEMAS[0])
        assert reply.reasoning_content == ""
        # thinking on: the section is opened for the model, free text; the constraint waits for </think>
        # (which this random model never writes: the answer stays empty and incomplete)
        reply = m.chat(msgs, think=True, json_schema=TINY_SCHEMAS[0], max_tokens=30, seed=1, temperature=1.0)
        assert reply.incomplete and str(reply) == "" and len(reply.reasoning_content) > 0


def _scripted(m, monkeypatch, text: str, masks: list[bool]) -> None:
    """The backend's steps write `text` first (unconstrained steps: a random model never would), then sample."""
    script = m.tokenize(text, add_special=False)
    step = m.backend.step

    def scripted(tokens, mask=None, mask_fn=None):  # mask_fn: a mask made during the step
        constrained = mask is not None or mask_fn is not None
        masks.append(constrained)
        token = step(tokens, mask, mask_fn=mask_fn)
        return script.pop(0) if not constrained and script else token

    monkeypatch.setattr(m.backend, "step", scripted)


def test_the_constraint_starts_when_the_thinking_ends(tiny_chat_gguf, tmp_path, monkeypatch):
    """The model's thinking is scripted (a random model never closes it): unconstrained steps write
    "ok, sure</think>", then every step has a mask and the answer validates."""
    path = _with_template(tiny_chat_gguf, tmp_path, THINK_TEMPLATE)
    with edgeai.load(path, backend="native", threads=1, n_ctx=512) as m:
        masks: list[bool] = []
        _scripted(m, monkeypatch, "ok, sure</think>", masks)
        reply = m.chat([{"role": "user", "content": "hi"}], think=True, json_schema=TINY_SCHEMAS[1],
                       max_tokens=300, seed=2, temperature=1.0)
        assert reply.reasoning_content == "ok, sure"
        _check(reply, TINY_SCHEMAS[1])
        n_think = len(m.tokenize("ok, sure</think>", add_special=False))
        assert not any(masks[:n_think]) and all(masks[n_think:])


# -- CLI and REPL -------------------------------------------------------------------------------------------------
def test_run_answers_with_a_schema_file(tmp_path):
    from typer.testing import CliRunner

    from edgeai.cli import app

    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps(SMOLLM2_CASES[2][1]))
    runner = CliRunner()
    out = runner.invoke(app, ["run", str(default_model_path()), "Classify 'great food' as JSON.", "--json-schema",
                              str(schema_file), "--temperature", "0", "--json", "--threads", "1"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["incomplete"] is False
    jsonschema.validate(json.loads(result["text"]), SMOLLM2_CASES[2][1])
    out = runner.invoke(app, ["run", str(default_model_path()), "A code:", "--regex", "[A-Z]{3}", "--raw",
                              "--temperature", "0", "--threads", "1"])
    assert out.exit_code == 0 and re.fullmatch(r"[A-Z]{3}", out.stdout.strip()), out.output
    (tmp_path / "bad.json").write_text('{"type": "strin"}')
    out = runner.invoke(app, ["run", str(default_model_path()), "x", "--json-schema", str(tmp_path / "bad.json")])
    assert out.exit_code != 0 and "Invalid type: strin" in out.output


def test_repl_format_command(tiny_chat_gguf, tmp_path):
    from rich.console import Console

    from edgeai.cli.repl import Repl

    with edgeai.load(tiny_chat_gguf, backend="native", threads=1, n_ctx=512) as m:
        console = Console(record=True, width=200)
        repl = Repl(m, console=console)
        repl.session.options.update(temperature=1.0, seed=3, max_tokens=300)
        repl.command("/format json")
        repl.turn("hello")
        answer = repl.session.messages[-1]["content"]
        assert isinstance(json.loads(answer), dict) or "incomplete" in console.export_text()
        (tmp_path / "s.json").write_text(json.dumps(TINY_SCHEMAS[1]))
        repl.command(f"/format schema {tmp_path / 's.json'}")
        repl.turn("again")
        jsonschema.validate(json.loads(repl.session.messages[-1]["content"]), TINY_SCHEMAS[1])
        repl.command("/format regex a(")
        assert "unclosed group" in console.export_text()
        repl.command("/format off")
        assert repl.session.constraint == {}


def test_repl_shows_the_thinking_apart_and_switches_it(tiny_chat_gguf, tmp_path, monkeypatch):
    from rich.console import Console

    from edgeai.cli.repl import Repl

    path = _with_template(tiny_chat_gguf, tmp_path, THINK_TEMPLATE)
    with edgeai.load(path, backend="native", threads=1, n_ctx=512) as m:
        console = Console(record=True, width=200)
        repl = Repl(m, console=console)
        repl.session.options.update(temperature=1.0, seed=3, max_tokens=30)
        _scripted(m, monkeypatch, "<think>pondering</think>", [])
        repl.turn("hello")
        out = console.export_text()
        assert "pondering" in out and "pondering" not in repl.session.messages[-1]["content"]
        monkeypatch.undo()
        asked = []
        render = m.render_chat
        monkeypatch.setattr(m, "render_chat", lambda msgs, **k: asked.append(k.get("think")) or render(msgs, **k))
        repl.command("/think off")
        assert repl.session.think is False and "think: off" in console.export_text()
        repl.turn("again")
        assert asked[-1] is False  # (the context check before it renders without the switch)
        repl.command("/think sometimes")
        assert "think: on | off" in console.export_text() and repl.session.think is False
    with edgeai.load(tiny_chat_gguf, backend="native", threads=1, n_ctx=512) as plain:
        repl = Repl(plain, console=console)
        repl.command("/think on")
        assert "no thinking section" in console.export_text() and repl.session.think is None
    from typer.testing import CliRunner

    from edgeai.cli import app

    result = CliRunner().invoke(app, ["chat", str(tiny_chat_gguf), "--think", "high", "--threads", "1"], input="/exit\n")
    assert result.exit_code == 1 and "no thinking section" in result.output


# -- harmony (gpt-oss): channels --------------------------------------------------------------------------------
# A harmony-format template written for the tests (gpt-oss's own is OpenAI's): reasoning effort in the
# system message, tools in the developer message, calls as commentary to functions.NAME, the generation
# prompt `<|start|>assistant`. In the tiny vocabulary its markers are plain text; in gpt-oss's they are
# special tokens, which the detokenizer writes as the same text.
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{%- if tools %}<|start|>developer<|message|># Tools\n{% for t in tools %}{{ t.function.name }}: "
    "{{ t.function.parameters | tojson }}\n{% endfor %}<|end|>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}"
    "{%- if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "<|start|>assistant to=functions.{{ m.tool_calls[0].function.name }}<|channel|>commentary json<|message|>"
    "{{ m.tool_calls[0].function.arguments | tojson }}<|call|>"
    "{%- elif m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'tool' %}<|start|>functions to=assistant<|channel|>commentary<|message|>{{ m.content | tojson }}<|end|>"
    "{%- else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start|>assistant{% endif %}"
)


@pytest.mark.parametrize("pieces, reasoning, answer, calls", [
    (["<|channel|>analysis<|mess", "age|>let me ", "see<|e", "nd|><|start|>assistant<|channel|>final<|message|>",
      '{"a"', ": 1}"], "let me see", '{"a": 1}', []),
    (["<|channel|>final<|message|>hi", " there"], "", "hi there", []),
    (["<|channel|>analysis<|message|>weather?<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather ",
      '<|constrain|>json<|message|>{"city": ', '"Oslo"}'], "weather?", "", [("get_weather", {"city": "Oslo"})]),
    (["<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.f<|channel|>commentary json",
      "<|message|>{}"], "", "Checking.", [("f", {})]),
    (["<|channel|>analysis<|message|>never ends"], "never ends", "", []),
    (["<|channel|>analysis<|message|>x<|end|><|start|>assistant<|chan"], "x", "", []),  # a cut header is no text
    (["plain text, no ", "harmony"], "", "plain text, no harmony", []),  # a model that does not write it
    (["<|channel|>commentary to=functions.nope<|message|>{}"], "", "{}", []),  # a tool not offered: text
])
def test_harmony_messages_are_split_by_channel(pieces, reasoning, answer, calls):
    from edgeai.tools import HarmonySplit

    split = HarmonySplit(tools=["get_weather", "f"])
    assert _split_all(split, pieces) == (reasoning, answer)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in split.tool_calls()] == calls


def test_harmony_thinking_levels_and_the_constraint_after_the_analysis(tiny_chat_gguf, tmp_path, monkeypatch):
    path = _with_template(tiny_chat_gguf, tmp_path, HARMONY_TEMPLATE)
    msgs = [{"role": "user", "content": "hi"}]
    with edgeai.load(path, backend="native", threads=1, n_ctx=2048) as m:
        assert m.harmony and m.thinks
        assert "Reasoning: medium" in m.render_chat(msgs) and "Reasoning: medium" in m.render_chat(msgs, think=True)
        assert "Reasoning: low" in m.render_chat(msgs, think=False)
        assert "Reasoning: high" in m.render_chat(msgs, think="high")
        with pytest.raises(edgeai.errors.OptionError, match="think must be"):
            m.render_chat(msgs, think="max")

        masks: list[bool] = []
        head = "<|channel|>analysis<|message|>let me see<|end|><|start|>assistant<|channel|>final<|message|>"
        _scripted(m, monkeypatch, head, masks)
        reply = m.chat(msgs, json_schema=TINY_SCHEMAS[1], max_tokens=300, seed=2, temperature=1.0)
        assert reply.reasoning_content == "let me see" and not reply.incomplete
        _check(reply, TINY_SCHEMAS[1])
        n_head = len(m.tokenize(head, add_special=False))
        assert not any(masks[:n_head]) and all(masks[n_head:])


def test_harmony_tool_calls_follow_each_tools_schema(tiny_chat_gguf, tmp_path, monkeypatch):
    path = _with_template(tiny_chat_gguf, tmp_path, HARMONY_TEMPLATE)
    tools = [_weather_tool(), _time_tool()]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    with edgeai.load(path, backend="native", threads=1, n_ctx=2048) as m:
        # auto: the model thinks, then addresses get_weather; from its message on, its schema holds
        masks: list[bool] = []
        head = ("<|channel|>analysis<|message|>weather<|end|><|start|>assistant<|channel|>"
                "commentary to=functions.get_weather <|constrain|>json<|message|>")
        _scripted(m, monkeypatch, head, masks)
        reply = m.chat(msgs, tools=tools, max_tokens=200, seed=0, temperature=1.0)
        assert reply.finish_reason is FinishReason.TOOL_CALLS and not reply.incomplete and str(reply) == ""
        assert reply.reasoning_content == "weather"
        (call,) = reply.tool_calls
        n_head = len(m.tokenize(head, add_special=False))
        assert call["function"]["name"] == "get_weather" and not any(masks[:n_head]) and all(masks[n_head:])
        monkeypatch.undo()

        # a message to a tool not offered is text, and no call
        _scripted(m, monkeypatch, '<|channel|>commentary to=functions.rm_rf <|constrain|>json<|message|>{"a": 1}', [])
        reply = m.chat(msgs, tools=tools, max_tokens=80, seed=0, temperature=1.0)
        assert reply.tool_calls == [] and str(reply).startswith('{"a": 1}')
        jsonschema.validate(json.loads(call["function"]["arguments"]), tools[0]["function"]["parameters"])
        monkeypatch.undo()

        # a named tool: the prompt opens its call, every step is constrained
        reply = m.chat(msgs, tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}},
                       max_tokens=200, seed=1, temperature=1.0)
        (call,) = reply.tool_calls
        assert call["function"]["name"] == "get_time" and reply.reasoning_content == ""
        jsonschema.validate(json.loads(call["function"]["arguments"]), tools[1]["function"]["parameters"])

        # the call and its result go back through the template (its thinking as `thinking`)
        turn = msgs + [{**reply.message(), "reasoning_content": "zone?"}, {"role": "tool", "content": "12:00", "tool_call_id": call["id"]}]
        text = m.render_chat(turn)
        assert "to=functions.get_time<|channel|>commentary json<|message|>" in text and "analysis<|message|>zone?" in text
        assert text.endswith('<|message|>"12:00"<|end|><|start|>assistant')

        with pytest.raises(edgeai.errors.OptionError, match="name it"):
            m.chat(msgs, tools=tools, tool_choice="required")
        with pytest.raises(edgeai.errors.OptionError, match="one call per answer"):
            m.chat(msgs, tools=tools, parallel_tool_calls=True)
        (only,) = m.chat(msgs, tools=tools[:1], tool_choice="required", max_tokens=200, seed=2).tool_calls
        assert only["function"]["name"] == "get_weather"


def test_harmony_template_renders_as_transformers_renders_it(tiny_chat_gguf, tmp_path):
    """Tools, a call with its thinking, a tool result with <, &, ' and non-ASCII text: the same text
    as transformers' apply_chat_template (its `tojson` is plain json.dumps, not jinja2's HTML-safe one)."""
    from transformers import AutoTokenizer

    path = _with_template(tiny_chat_gguf, tmp_path, HARMONY_TEMPLATE)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    msgs = [{"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": "", "thinking": "a <tool> & 'then' answer",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich <3>", "unit": "C"}}}]},
            {"role": "tool", "content": "<b>21 °C</b> & 'dry'"}]
    with edgeai.load(path, backend="native", threads=1, n_ctx=2048) as m:
        for effort in (None, "high"):
            ours = m.render_chat(msgs, tools=[_weather_tool()], think=effort)
            theirs = hf.apply_chat_template(msgs, tools=[_weather_tool()], tokenize=False, add_generation_prompt=True,
                                            **({"reasoning_effort": effort} if effort else {}))
            assert ours == theirs and "&lt;" not in ours


def test_drafts_past_a_harmony_call_header_are_dropped(tiny_chat_gguf, tmp_path):
    """Speculative decoding accepts several tokens at once; when a call's header ends inside them, the
    tokens after it were drafted without the tool's mask: they are dropped (the cache cut back) and
    the arguments are generated under the mask. (Before: the unmasked tokens reached the matcher.)"""
    path = _with_template(tiny_chat_gguf, tmp_path, HARMONY_TEMPLATE)
    with edgeai.load(path, backend="native", threads=1, n_ctx=2048) as m:
        be = m.backend
        header = m.tokenize("<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>", add_special=False)
        junk = m.tokenize("xx yy", add_special=False)  # not JSON: the tool's mask forbids it

        class Accepting:  # a speculator whose first verification "accepts" the header and junk after it
            calls = 0

            def begin(self, params):
                pass

            def step(self, pending, context, *, limit, mask=None, matcher=None):
                Accepting.calls += 1
                if Accepting.calls > 1:
                    return [be.step(pending, mask)]
                toks = header + junk
                be.step(pending + toks[:-1])  # evaluated as a verification would: the last is not cached
                return toks

            def close(self):
                pass

        m._speculator = Accepting()
        reply = m.chat([{"role": "user", "content": "time?"}], tools=[_time_tool()], max_tokens=200, seed=0, temperature=1.0)
        assert Accepting.calls > 1, reply
        assert reply.tool_calls, (str(reply), reply.finish_reason, reply.incomplete, reply.reasoning_content)
        (call,) = reply.tool_calls
        jsonschema.validate(json.loads(call["function"]["arguments"]), _time_tool()["function"]["parameters"])
        assert be.history[-1] != junk[-1]
