"""`edgeai serve` started as a user starts it (a child process on 127.0.0.1, a free port), driven by the
official `openai` client and by plain HTTP (the standard library): both API formats, streaming,
tools, response_format, auth, bad input, disconnects, concurrency, and a bounded fuzz run."""

from __future__ import annotations

import http.client
import json
import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest

import edgeai
from edgeai.paths import default_model_path

EDGEAI = str(Path(sys.executable).parent / "edgeai")
KEY = "test-key-123"


class Served:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([EDGEAI, "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and not line.startswith("serving on"):
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"edgeai serve exited: {self.proc.stderr.read()}")
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        """(status, parsed JSON or text) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        try:
            return r.status, json.loads(text)
        except json.JSONDecodeError:
            return r.status, text

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server():
    s = Served("--backend", "native", "--threads", "1", "--n-ctx", "1024", "--max-queue", "4")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def name(client):
    (model,) = client.models.list().data
    return model.id


def test_chat_and_completions_through_the_openai_client(client, name):
    msgs = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    with edgeai.load(default_model_path(), backend="native", threads=1, n_ctx=1024) as m:
        assert text == m.chat(msgs, max_tokens=12, temperature=0)  # the same engine in-process
    parts, usage = [], None
    for chunk in client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(parts) == text and usage.completion_tokens == r.usage.completion_tokens
    c = client.completions.create(model=name, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    assert c.choices[0].text and len(c.choices[0].logprobs.token_logprobs) == c.usage.completion_tokens
    streamed = "".join(x.choices[0].text for x in client.completions.create(
        model=name, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True))
    assert streamed == c.choices[0].text


def test_response_format_logprobs_and_tools(client, name):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer"}},
              "required": ["colour", "n"], "additionalProperties": False}
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "A colour as JSON"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
                                       max_tokens=40, temperature=0, logprobs=True, top_logprobs=3)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens and all(len(x.top_logprobs) == 3 and x.logprob <= 0 for x in lps)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}}}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=name, messages=msgs, tools=tools, tool_choice="required", max_tokens=60,
                                       temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    r = client.chat.completions.create(model=name, messages=msgs, tools=tools, max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_ollama_endpoints(server, name):
    status, tags = server.request("GET", "/api/tags")
    assert status == 200 and tags["models"][0]["name"] == name and tags["models"][0]["details"]["format"] == "gguf"
    assert server.request("GET", "/api/version")[1]["version"]
    status, show = server.request("POST", "/api/show", {"model": name})
    assert status == 200 and "im_start" in show["template"] and show["model_info"]["context_length"] == 1024
    status, lines = server.request("POST", "/api/chat", {"model": name, "messages": [{"role": "user", "content": "Hi"}],
                                                         "options": {"temperature": 0, "num_predict": 6}})
    events = [json.loads(x) for x in lines.strip().splitlines()]  # NDJSON, streamed by default
    assert status == 200 and events[-1]["done"] and events[-1]["eval_count"] <= 6
    assert all(not e["done"] for e in events[:-1]) and all(e["message"]["role"] == "assistant" for e in events)
    text = "".join(e["message"]["content"] for e in events)
    status, whole = server.request("POST", "/api/chat", {"model": name, "messages": [{"role": "user", "content": "Hi"}],
                                                         "stream": False, "options": {"temperature": 0, "num_predict": 6}})
    assert whole["message"]["content"] == text and whole["done_reason"] in ("stop", "length")
    status, gen = server.request("POST", "/api/generate", {"model": name, "prompt": "Hello", "stream": False,
                                                           "format": {"type": "object", "properties": {"a": {"type": "boolean"}},
                                                                      "required": ["a"], "additionalProperties": False},
                                                           "options": {"temperature": 0, "num_predict": 20}})
    assert status == 200 and isinstance(json.loads(gen["response"])["a"], bool)
    # keep_alive 0 unloads; the next request loads again
    status, out = server.request("POST", "/api/generate", {"model": name, "keep_alive": 0})
    assert out["done_reason"] == "unload" and server.request("GET", "/health")[1]["loaded"] is False
    status, gen = server.request("POST", "/api/generate", {"model": name, "prompt": "Hi", "stream": False,
                                                           "options": {"num_predict": 2}})
    assert status == 200 and server.request("GET", "/health")[1]["loaded"] is True


def test_the_official_ollama_client(server, name):
    """The ollama API as ollama's own Python client speaks it (pinned in the test extras)."""
    import ollama

    client = ollama.Client(host=server.url, timeout=120)
    assert [m.model for m in client.list().models] == [name]
    r = client.chat(model=name, messages=[{"role": "user", "content": "Hi"}], options={"temperature": 0, "num_predict": 6})
    assert r.done and r.message.role == "assistant" and r.eval_count <= 6
    parts = [p.message.content for p in client.chat(model=name, messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                    options={"temperature": 0, "num_predict": 6})]
    assert "".join(parts) == r.message.content
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    g = client.generate(model=name, prompt="Is water wet?", format=schema, options={"temperature": 0, "num_predict": 20})
    assert isinstance(json.loads(g.response)["ok"], bool)
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
    r = client.chat(model=name, messages=[{"role": "user", "content": "What time is it in UTC?"}], tools=tools,
                    options={"temperature": 0, "num_predict": 60})
    assert r.message.tool_calls is None or r.message.tool_calls[0].function.name == "get_time"
    assert client.show(name).modelinfo["context_length"] == 1024
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llama3", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/chat/completions", b"{bad", 400, "not JSON"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "not served here"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "'temperature'"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages'"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role 'robot'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "context"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema",
                              "json_schema": {"schema": {"type": "strin"}}}}, 400, "Invalid type: strin"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "grammar": 'root ::= "a" b'}, 400, "Rule 'b'"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "format": "xml"}, 400, "'format'"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "think": "max"}, 400, "'think' must be true, false or one of low"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": True}, 400, "'reasoning_effort'"),
    ("/v1/chat/completions", b"x" * (5 * 2**20), 413, "larger than"),
    ("/v1/nothing", {}, 404, "no such endpoint"),
])
def test_bad_requests_get_a_clear_error_and_the_server_goes_on(server, path, body, status, words):
    got, reply = server.request("POST", path, body)
    assert got == status and words in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert server.request("GET", "/health")[1]["status"] == "ok"


def test_an_api_key_is_required_when_set(tiny_chat_gguf):
    s = Served(str(tiny_chat_gguf), "--threads", "1", "--api-key", KEY)
    try:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert s.request("POST", "/v1/chat/completions", body)[0] == 401
        assert s.request("POST", "/v1/chat/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert s.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})[0] == 200
        assert s.request("GET", "/health")[0] == 200  # for load balancers and supervisors
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        s.close()


def test_a_client_that_disconnects_frees_the_model(server, name):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": name, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000,
        "stream": True, "temperature": 0}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    assert server.request("GET", "/health")[1]["busy"] is True
    conn.sock.close()  # gone mid-stream
    conn.close()
    deadline = time.monotonic() + 20
    while server.request("GET", "/health")[1]["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.request("GET", "/health")[1]["busy"] is False


def test_concurrent_streams_equal_the_same_requests_one_at_a_time(client, name):
    prompts = ["Name a fruit.", "Name a planet.", "Name a river."]

    def ask(p):
        return "".join((c.choices[0].delta.content or "") for c in client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0, stream=True) if c.choices)

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


@pytest.fixture(scope="module")
def batched():
    """A server decoding up to three requests in one batched step (--parallel 3)."""
    s = Served("--backend", "native", "--threads", "1", "--n-ctx", "512", "--parallel", "3")
    yield s
    s.close()


def test_batched_streams_equal_the_same_requests_one_at_a_time(batched):
    """Four streams on three slots (the fourth waits for a slot) through the openai client: each
    greedy answer equals the same request run alone, while /health saw several generate at once;
    then a client that disconnects mid-stream frees its slot at the next step."""
    client = openai.OpenAI(base_url=batched.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    (model,) = client.models.list().data
    prompts = ["Name a fruit.", "Name a planet.", "Count from one to twenty.", "Name a river."]

    def ask(p):
        return "".join((c.choices[0].delta.content or "") for c in client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0, stream=True)
            if c.choices)

    alone = [ask(p) for p in prompts]
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(batched.request("GET", "/health")[1])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, prompts))
    finally:
        stop.set()
        watcher.join()
    assert together == alone
    assert seen[0]["slots"] == 3 and max(h["active"] for h in seen) >= 2
    assert max(h["active"] for h in seen) <= 3

    conn = http.client.HTTPConnection("127.0.0.1", batched.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 400,
                                                         "stream": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    assert batched.request("GET", "/health")[1]["active"] == 1
    conn.sock.close()  # gone mid-stream
    conn.close()
    deadline = time.monotonic() + 20
    while batched.request("GET", "/health")[1]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batched.request("GET", "/health")[1]["active"] == 0
    assert ask(prompts[0]) == alone[0]  # the slots serve on


def test_a_full_queue_answers_503_with_a_reason(server, name):
    body = {"model": name, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 60}
    with ThreadPoolExecutor(8) as pool:  # one runs, four wait (--max-queue 4), the rest are turned away
        replies = list(pool.map(lambda _: server.request("POST", "/v1/chat/completions", body), range(8)))
    busy = [r for s, r in replies if s == 503]
    assert busy and all("waiting for the model" in r["error"]["message"] for r in busy)
    assert any(s == 200 for s, _ in replies)


def test_bounded_fuzz_of_malformed_requests(server, name):
    """Random bodies, headers and truncated requests: every reply is a well-formed error (or a valid
    answer), nothing hangs, and the server still answers afterwards."""
    rng = random.Random(7)
    fields = ["model", "messages", "prompt", "stream", "max_tokens", "temperature", "tools", "response_format", "stop",
              "logprobs", "options", "format", "keep_alive", "seed", "top_p"]
    values = [None, True, -1, 0, 2**70, 1.5, "x", "", [], {}, [{"role": "user"}], [{"role": "user", "content": 5}],
              {"type": "json_schema"}, ["\x00"], {"temperature": "x"}, [{"type": "function"}], "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
    paths = ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show"]
    deadline = time.monotonic() + 40
    n = 0
    while n < 150 and time.monotonic() < deadline:
        n += 1
        path = rng.choice(paths)
        kind = rng.random()
        if kind < 0.15:  # truncated: announce more than is sent, then hang up
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.putrequest("POST", path)
            conn.putheader("Content-Length", "1000")
            conn.endheaders(b'{"messages": [')
            conn.close()
            continue
        if kind < 0.3:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        else:
            obj = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 5))}
            obj.setdefault("max_tokens", 2)
            if isinstance(obj.get("options"), dict):
                obj["options"]["num_predict"] = 2
            body = json.dumps(obj).encode()
        status, reply = server.request("POST", path, body, timeout=30)
        if status != 200:
            assert 400 <= status < 600 and isinstance(reply, dict) and set(reply["error"]) >= {"message", "type"}, (status, reply)
    assert server.request("GET", "/health")[1]["status"] == "ok"
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")
