"""`edgeai serve`: one model behind the HTTP APIs apps already speak, OpenAI's (`/v1/chat/completions`,
`/v1/completions`, `/v1/models`) and ollama's (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`,
`/api/version`), plus `/health`.

Built on Starlette (routing, requests, streaming responses) served by uvicorn: a small, well-kept
ASGI pair (FastAPI is Starlette plus pydantic models we do not need; aiohttp would bring its own
server and client stack), so no HTTP parsing is written here. This module only translates formats
and enforces limits; generation runs in `edgeai.scheduler.Scheduler`, which owns the model.

Safe by default: it binds to 127.0.0.1; with an API key (`--api-key` or EDGEAI_API_KEY) every
endpoint but /health wants `Authorization: Bearer KEY`; request bodies, max_tokens and queued
requests are bounded; every error is a JSON body in OpenAI's shape ({"error": {"message", "type",
"param", "code"}}) with its 4xx/5xx status, never a stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeai.errors import (BackendError, ChatTemplateError, ContextOverflowError, EdgeAIError, OptionError)
from edgeai.model import Chunk, FinishReason, Model, Reply
from edgeai.scheduler import BusyError, Scheduler

log = logging.getLogger(__name__)

MAX_BODY = 4 * 2**20  # bytes of one request body
SAMPLING_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float,
                   "repeat_last_n": int, "seed": int}
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CONTEXT: "length",
          FinishReason.TOOL_CALLS: "tool_calls"}


class HTTPError(Exception):
    """An error reply: status, message, and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass
class ServerConfig:
    """What `serve` needs: the model, how to load it, and the limits."""

    model: Path
    load_options: dict = field(default_factory=dict)  # edgeai.load's keyword arguments
    name: str | None = None  # the model's name in the APIs (default: the file's stem)
    api_key: str | None = None
    max_queue: int = 16  # requests waiting for the model (more: 503)
    max_body: int = MAX_BODY
    keep_alive: float = -1  # seconds a model stays loaded after its last request (< 0: for ever), as ollama's keep_alive

    @property
    def model_name(self) -> str:
        return self.name or self.model.name.removesuffix(".gguf")


class ModelHost:
    """The loaded model and its scheduler; loads on demand and unloads after keep_alive idle seconds."""

    def __init__(self, config: ServerConfig, loader: Callable[..., Model]) -> None:
        self.config = config
        self._loader = loader
        self.scheduler: Scheduler | None = None
        self._lock = asyncio.Lock()
        self.unload_at: float | None = None
        self.loaded_at = 0.0
        self.keep_alive = config.keep_alive

    async def get(self) -> Scheduler:
        """The scheduler of the loaded model (loading it first if needed)."""
        async with self._lock:
            if self.scheduler is None:
                t0 = time.perf_counter()
                model = await asyncio.to_thread(self._loader, self.config.model, **self.config.load_options)
                self.scheduler = Scheduler(model, max_queue=self.config.max_queue)
                self.loaded_at = time.perf_counter() - t0
                log.info("loaded %s in %.1f s", self.config.model_name, self.loaded_at)
            self.unload_at = None
            return self.scheduler

    def done(self, keep_alive: float | None) -> None:
        """A request finished: the unload timer starts (keep_alive seconds; < 0 never)."""
        seconds = self.keep_alive if keep_alive is None else keep_alive
        self.unload_at = None if seconds < 0 else time.monotonic() + seconds

    async def maybe_unload(self) -> None:
        async with self._lock:
            s = self.scheduler
            if s is None or self.unload_at is None or time.monotonic() < self.unload_at or s.active or s.waiting:
                return
            self.scheduler = None
            s.close()
            await asyncio.to_thread(s.model.close)
            log.info("unloaded %s (keep_alive)", self.config.model_name)

    async def close(self) -> None:
        if self.scheduler is not None:
            s, self.scheduler = self.scheduler, None
            s.close()
            s.model.close()


# -- request fields ------------------------------------------------------------------------------------
def _get(body: Mapping, name: str, kind: type | tuple, default: Any = None, *, where: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                             list: "a list", dict: "an object"}[k] for k in kinds)
        raise HTTPError(400, f"'{where}{name}' must be {names}, got {json.dumps(value)[:60]}", where + name)
    return value


def _think(body: Mapping, name: str = "think", kinds: tuple = (bool, str)) -> Any:
    """ollama's `think` (true, false, or a level for gpt-oss) or OpenAI's `reasoning_effort` (a level)."""
    from edgeai.tools import REASONING_EFFORTS

    value = _get(body, name, kinds)
    if isinstance(value, str) and value not in REASONING_EFFORTS:
        raise HTTPError(400, f"'{name}' must be {'true, false or ' if bool in kinds else ''}one of "
                             f"{', '.join(REASONING_EFFORTS)}, got {json.dumps(value)[:40]}", name)
    return value


def _sampling(body: Mapping, *, where: str = "") -> dict:
    out = {}
    for name, kind in SAMPLING_FIELDS.items():
        value = _get(body, name, kind, where=where)
        if value is not None:
            out[name] = float(value) if kind is float else value
    return out


def _stops(value: Any, param: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 16:
        return value
    raise HTTPError(400, f"'{param}' must be a string or a list of at most 16 strings", param)


def _error_body(exc: HTTPError) -> dict:
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}}


def _as_http(exc: BaseException) -> HTTPError:
    """An error of the library or the scheduler as the reply it deserves."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, BusyError):
        return HTTPError(503, str(exc), kind="server_busy")
    if isinstance(exc, (OptionError, ContextOverflowError, ChatTemplateError)):
        return HTTPError(400, str(exc))
    if isinstance(exc, BackendError):
        return HTTPError(501, str(exc), kind="not_supported")
    if isinstance(exc, EdgeAIError):
        return HTTPError(500, str(exc), kind="server_error")
    log.exception("internal error", exc_info=exc)
    return HTTPError(500, "internal error (see the server's log)", kind="server_error")


# -- the app ----------------------------------------------------------------------------------------------
def create_app(config: ServerConfig, *, loader: Callable[..., Model] | None = None):
    """The ASGI app serving `config.model` (loaded on the first request, or at start-up by `serve`)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    if loader is None:
        from edgeai.api import load as loader
    host = ModelHost(config, loader)
    name = config.model_name

    async def body_of(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > config.max_body):
            raise HTTPError(413, f"the request body is larger than {config.max_body} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > config.max_body:
                raise HTTPError(413, f"the request body is larger than {config.max_body} bytes")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        requested = body.get("model")
        if requested not in (None, "", name) and not (isinstance(requested, str) and requested.split(":")[0] == name):
            raise HTTPError(404, f"model {json.dumps(requested)[:80]} is not served here; this server serves {name!r}",
                            "model", "model_not_found")
        return body

    async def start(job_fn, keep_alive: float | None = None) -> tuple[Any, Any, Chunk]:
        """Submit a job; returns (job, its iterator, first item), raising its error before any reply."""
        scheduler = await host.get()
        job = scheduler.submit(job_fn, loop=asyncio.get_running_loop())
        items = job.__aiter__()
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            raise HTTPError(500, "the generation ended without an answer", kind="server_error") from None
        except BaseException:
            job.cancel()
            host.done(keep_alive)
            raise
        return job, items, first

    async def collect(job, items, first) -> tuple[Reply, list[Chunk]]:
        """A whole non-streamed answer: the Reply its chunks add up to, and the chunks."""
        chunks = [c async for c in drain(job, items, first)]
        return Reply.of(iter(chunks)), chunks

    async def drain(job, items, first) -> AsyncIterator[Chunk]:
        try:
            yield first
            async for item in items:
                yield item
        finally:
            job.cancel()  # a client gone mid-stream: the scheduler stops the job at its next token

    def endpoint(fn):
        async def handler(request: Request) -> Response:
            if config.api_key and request.url.path != "/health":
                auth = request.headers.get("authorization", "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                    return JSONResponse(_error_body(HTTPError(401, "a valid API key is required: send "
                                                                   "'Authorization: Bearer KEY'",
                                                              kind="authentication_error")), 401)
            try:
                return await fn(request)
            except Exception as exc:  # noqa: BLE001 - every error becomes a well-formed reply
                err = _as_http(exc)
                return JSONResponse(_error_body(err), err.status)
        return handler

    def sse(events: AsyncIterator[dict]) -> StreamingResponse:
        async def lines():
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes as an event
                yield f"data: {json.dumps(_error_body(_as_http(exc)))}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def ndjson(events: AsyncIterator[dict]) -> StreamingResponse:
        async def lines():
            try:
                async for event in events:
                    yield json.dumps(event, ensure_ascii=False) + "\n"
            except Exception as exc:  # noqa: BLE001
                yield json.dumps({"error": _as_http(exc).message}) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # -- OpenAI ---------------------------------------------------------------------------------------------
    def openai_options(body: dict) -> dict:
        if _get(body, "n", int, 1) != 1:
            raise HTTPError(400, "'n' must be 1: one answer per request", "n")
        for penalty in ("presence_penalty", "frequency_penalty"):
            if _get(body, penalty, float, 0) != 0:
                raise HTTPError(400, f"'{penalty}' is not supported; use repeat_penalty", penalty)
        max_tokens = _get(body, "max_completion_tokens", int) or _get(body, "max_tokens", int)
        opts = {**_sampling(body), "stop": _stops(body.get("stop"), "stop")}
        if max_tokens is not None:
            opts["max_tokens"] = max_tokens
        return opts

    def logprob_entry(model: Model, token: int, lp: float) -> dict:
        text = model.detokenize([token])
        return {"token": text.decode("utf-8", "replace"), "logprob": lp, "bytes": list(text)}

    async def chat_completions(request: Request) -> Response:
        body = await body_of(request)
        messages = _get(body, "messages", list)
        if not messages:
            raise HTTPError(400, "'messages' must be a non-empty list", "messages")
        opts = openai_options(body)
        want_lp = _get(body, "logprobs", bool, False)
        top_lp = _get(body, "top_logprobs", int, 0)
        if want_lp:
            opts["logprobs"] = top_lp
        for key in ("response_format", "tools", "tool_choice"):
            if body.get(key) is not None:
                opts[key] = body[key]
        if body.get("parallel_tool_calls") is not None:
            opts["parallel_tool_calls"] = _get(body, "parallel_tool_calls", bool)
        kwargs = _get(body, "chat_template_kwargs", dict, {})
        if "enable_thinking" in kwargs:
            opts["think"] = bool(kwargs["enable_thinking"])
        if body.get("reasoning_effort") is not None and "enable_thinking" not in kwargs:
            # OpenAI's; a harmony template's (gpt-oss) level, thinking on for others; "minimal" is gpt-oss's "low"
            opts["think"] = _think({"reasoning_effort": "low" if body["reasoning_effort"] == "minimal"
                                    else body["reasoning_effort"]}, "reasoning_effort", (str,))
        stream = _get(body, "stream", bool, False)
        include_usage = bool(_get(body, "stream_options", dict, {}).get("include_usage"))
        job, items, first = await start(lambda m: m.chat(messages, stream=True, **opts))
        model = host.scheduler.model
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

        def lp_of(c: Chunk) -> dict | None:
            if c.logprobs is None or c.token is None:
                return None
            e = logprob_entry(model, c.token, c.logprobs.logprob)
            e["top_logprobs"] = [logprob_entry(model, t, v) for t, v in c.logprobs.top]
            return e

        if stream:
            async def events():
                head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name}
                yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]}
                last = None
                async for c in drain(job, items, first):
                    last = c
                    delta: dict = {}
                    if c.text:
                        delta["content"] = c.text
                    if c.reasoning:
                        delta["reasoning_content"] = c.reasoning
                    if c.tool_calls:
                        delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(c.tool_calls)]
                    lp = lp_of(c)
                    if delta or lp or c.finish_reason is not None:
                        choice = {"index": 0, "delta": delta, "finish_reason": FINISH.get(c.finish_reason)}
                        if lp:
                            choice["logprobs"] = {"content": [lp]}
                        yield {**head, "choices": [choice]}
                host.done(None)
                if include_usage and last is not None:
                    yield {**head, "choices": [], "usage": usage(last)}
            return sse(events())
        reply, chunks = await collect(job, items, first)
        host.done(None)
        message = reply.message()
        if reply.tool_calls:
            message["content"] = message["content"] or None
        lps = [e for c in chunks if (e := lp_of(c)) is not None]
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                             "choices": [{"index": 0, "message": message, "finish_reason": FINISH.get(reply.finish_reason),
                                          "logprobs": {"content": lps} if want_lp else None}],
                             "usage": usage(chunks[-1])})

    def usage(last: Chunk) -> dict:
        t = last.timings
        prompt = t.prompt_tokens + t.cached_tokens
        return {"prompt_tokens": prompt, "completion_tokens": t.generated_tokens,
                "total_tokens": prompt + t.generated_tokens,
                "prompt_tokens_details": {"cached_tokens": t.cached_tokens}}

    async def completions(request: Request) -> Response:
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise HTTPError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt")
        if _get(body, "echo", bool, False) or body.get("suffix"):
            raise HTTPError(400, "'echo' and 'suffix' are not supported", "echo")
        opts = openai_options(body)
        n_lp = _get(body, "logprobs", int)
        if n_lp is not None:
            opts["logprobs"] = n_lp
        for key in ("grammar", "json_schema", "regex", "response_format"):  # llama-server's extensions too
            if body.get(key) is not None:
                opts[key] = body[key]
        stream = _get(body, "stream", bool, False)
        job, items, first = await start(lambda m: m.stream(prompt, **opts))
        model = host.scheduler.model
        cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())

        def lp_of(c: Chunk) -> dict | None:
            if c.logprobs is None or c.token is None:
                return None
            tok = model.detokenize([c.token]).decode("utf-8", "replace")
            return {"tokens": [tok], "token_logprobs": [c.logprobs.logprob],
                    "top_logprobs": [{model.detokenize([t]).decode("utf-8", "replace"): v for t, v in c.logprobs.top}]}

        if stream:
            async def events():
                async for c in drain(job, items, first):
                    if c.text or c.finish_reason is not None:
                        yield {"id": cid, "object": "text_completion", "created": created, "model": name,
                               "choices": [{"index": 0, "text": c.text, "logprobs": lp_of(c),
                                            "finish_reason": FINISH.get(c.finish_reason)}]}
                host.done(None)
            return sse(events())
        reply, chunks = await collect(job, items, first)
        host.done(None)
        lps = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        for e in filter(None, map(lp_of, chunks)):
            for k in lps:
                lps[k] += e[k]
        return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": name,
                             "choices": [{"index": 0, "text": str(reply), "logprobs": lps if n_lp is not None else None,
                                          "finish_reason": FINISH.get(reply.finish_reason)}],
                             "usage": usage(chunks[-1])})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": int(config.model.stat().st_mtime)
                                                          if config.model.exists() else 0, "owned_by": "edgeai"}]})

    async def health(request: Request) -> Response:
        s = host.scheduler
        return JSONResponse({"status": "ok", "model": name, "loaded": s is not None,
                             "busy": bool(s and s.active), "waiting": s.waiting if s else 0,
                             "active": s.active if s else 0, "slots": s.slots if s else None})

    # -- ollama ---------------------------------------------------------------------------------------------
    def ollama_options(body: dict) -> dict:
        options = _get(body, "options", dict, {})
        opts = _sampling(options, where="options.")
        opts["stop"] = _stops(options.get("stop"), "options.stop")
        n = _get(options, "num_predict", int, where="options.")
        if n is not None and n >= 0:
            opts["max_tokens"] = max(n, 1)
        elif n is not None:  # -1: until the context is full
            opts["max_tokens"] = 1 << 30
        fmt = body.get("format")
        if fmt == "json":
            opts["response_format"] = {"type": "json_object"}
        elif isinstance(fmt, dict):
            opts["json_schema"] = fmt
        elif fmt not in (None, ""):
            raise HTTPError(400, "'format' must be \"json\" or a JSON Schema object", "format")
        return opts

    def keep_alive_of(body: dict) -> float | None:
        value = body.get("keep_alive")
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        m = re.fullmatch(r"\s*(-?[0-9.]+)\s*(ms|s|m|h)?\s*", str(value))
        if not m:
            raise HTTPError(400, "'keep_alive' must be seconds or a duration like \"5m\", \"1h\", \"0\", \"-1\"",
                            "keep_alive")
        return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]

    def stamp() -> str:
        return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def ollama_done(last: Chunk, t_start: float) -> dict:
        t = last.timings
        return {"done": True, "done_reason": FINISH.get(last.finish_reason, "stop"),
                "total_duration": int((time.perf_counter() - t_start) * 1e9), "load_duration": int(host.loaded_at * 1e9),
                "prompt_eval_count": t.prompt_tokens, "prompt_eval_duration": int(t.prompt_seconds * 1e9),
                "eval_count": t.generated_tokens, "eval_duration": int(t.decode_seconds * 1e9)}

    async def unload_now(body: dict, key: str) -> Response | None:
        """ollama's way to unload: an empty request with keep_alive 0."""
        if keep_alive_of(body) == 0 and not body.get(key):
            host.done(0)
            await host.maybe_unload()
            empty = {"role": "assistant", "content": ""} if key == "messages" else ""
            return JSONResponse({"model": name, "created_at": stamp(), ("message" if key == "messages" else "response"): empty,
                                 "done_reason": "unload", "done": True})
        return None

    def ollama_calls(calls: tuple) -> list[dict]:
        return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in calls]

    async def api_chat(request: Request) -> Response:
        body = await body_of(request)
        if (r := await unload_now(body, "messages")) is not None:
            return r
        messages = _get(body, "messages", list)
        if not messages:
            raise HTTPError(400, "'messages' must be a non-empty list", "messages")
        if any(isinstance(m, dict) and m.get("images") for m in messages):
            raise HTTPError(400, "images are not supported: this server runs text models", "messages")
        msgs = [{**m, "role": m.get("role"), "content": m.get("content") if m.get("content") is not None else ""}
                if isinstance(m, dict) else m for m in messages]
        opts = ollama_options(body)
        if body.get("tools"):
            opts["tools"] = body["tools"]
        if body.get("think") is not None:
            opts["think"] = _think(body)
        keep = keep_alive_of(body)
        t_start = time.perf_counter()
        job, items, first = await start(lambda m: m.chat(msgs, stream=True, **opts), keep)
        if _get(body, "stream", bool, True):
            async def events():
                async for c in drain(job, items, first):
                    msg: dict = {"role": "assistant", "content": c.text}
                    if c.reasoning:
                        msg["thinking"] = c.reasoning
                    if c.tool_calls:
                        msg["tool_calls"] = ollama_calls(c.tool_calls)
                    if c.finish_reason is None:
                        if c.text or c.reasoning:
                            yield {"model": name, "created_at": stamp(), "message": msg, "done": False}
                    else:
                        yield {"model": name, "created_at": stamp(), "message": msg, **ollama_done(c, t_start)}
                host.done(keep)
            return ndjson(events())
        reply, chunks = await collect(job, items, first)
        host.done(keep)
        msg = {"role": "assistant", "content": str(reply)}
        if reply.reasoning_content:
            msg["thinking"] = reply.reasoning_content
        if reply.tool_calls:
            msg["tool_calls"] = ollama_calls(reply.tool_calls)
        return JSONResponse({"model": name, "created_at": stamp(), "message": msg, **ollama_done(chunks[-1], t_start)})

    async def api_generate(request: Request) -> Response:
        body = await body_of(request)
        if (r := await unload_now(body, "prompt")) is not None:
            return r
        prompt = _get(body, "prompt", str, "")
        if not prompt:
            raise HTTPError(400, "'prompt' must be a non-empty string", "prompt")
        if body.get("images"):
            raise HTTPError(400, "images are not supported: this server runs text models", "images")
        system = _get(body, "system", str)
        raw = _get(body, "raw", bool, False)
        opts = ollama_options(body)
        if body.get("think") is not None:
            opts["think"] = _think(body)
        keep = keep_alive_of(body)

        def job_fn(m: Model):
            if raw or m.plain_chat:
                opts.pop("think", None)
                return m.stream(prompt, **opts)
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return m.chat(msgs, stream=True, **opts)

        t_start = time.perf_counter()
        job, items, first = await start(job_fn, keep)
        if _get(body, "stream", bool, True):
            async def events():
                async for c in drain(job, items, first):
                    event = {"model": name, "created_at": stamp(), "response": c.text}
                    if c.reasoning:
                        event["thinking"] = c.reasoning
                    if c.finish_reason is None:
                        if c.text or c.reasoning:
                            yield {**event, "done": False}
                    else:
                        yield {**event, **ollama_done(c, t_start)}
                host.done(keep)
            return ndjson(events())
        reply, chunks = await collect(job, items, first)
        host.done(keep)
        out = {"model": name, "created_at": stamp(), "response": str(reply), **ollama_done(chunks[-1], t_start)}
        if reply.reasoning_content:
            out["thinking"] = reply.reasoning_content
        return JSONResponse(out)

    def details() -> dict:
        from edgeai.gguf_header import read_header

        info = {"format": "gguf" if config.model.suffix == ".gguf" else "onnx", "family": "", "parameter_size": "",
                "quantization_level": ""}
        try:
            h = read_header(config.model) if config.model.suffix == ".gguf" else None
        except EdgeAIError:
            h = None
        if h is not None:
            arch = h.metadata.get("general.architecture", "")
            info.update(family=arch, families=[arch], parameter_size=str(h.metadata.get("general.size_label", "")))
        return info

    async def api_tags(request: Request) -> Response:
        path = config.model
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*") if f.is_file())
        modified = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
        return JSONResponse({"models": [{"name": name, "model": name, "modified_at": modified, "size": size,
                                         "digest": "", "details": details()}]})

    async def api_show(request: Request) -> Response:
        await body_of(request)
        s = await host.get()
        m = s.model
        capabilities = ["completion"] + (["tools"] if m.chat_template and "tools" in m.chat_template else []) \
            + (["thinking"] if m.thinks else [])
        return JSONResponse({"modelfile": f"FROM {config.model}\n", "parameters": "", "template": m.chat_template or "",
                             "details": details(), "model_info": {"general.architecture": details()["family"],
                                                                  "context_length": m.n_ctx},
                             "capabilities": capabilities})

    async def api_version(request: Request) -> Response:
        from edgeai.version import __version__

        return JSONResponse({"version": __version__})

    async def root(request: Request) -> Response:
        return PlainTextResponse("edgeai is running")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = "no such endpoint" if status == 404 else "method not allowed on this endpoint"
        return JSONResponse(_error_body(HTTPError(status, f"{msg}: {request.method} {request.url.path}")), status)

    async def janitor():
        while True:
            await asyncio.sleep(1)
            await host.maybe_unload()

    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(janitor())
        try:
            yield
        finally:
            task.cancel()
            await host.close()

    routes = [Route("/", endpoint(root)), Route("/health", endpoint(health)),
              Route("/v1/models", endpoint(models)),
              Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
              Route("/v1/completions", endpoint(completions), methods=["POST"]),
              Route("/api/chat", endpoint(api_chat), methods=["POST"]),
              Route("/api/generate", endpoint(api_generate), methods=["POST"]),
              Route("/api/tags", endpoint(api_tags)), Route("/api/show", endpoint(api_show), methods=["POST"]),
              Route("/api/version", endpoint(api_version))]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.host = host
    return app


def serve(model: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          name: str | None = None, max_queue: int = 16, max_connections: int = 64, keep_alive: float = -1,
          backend: str = "auto", memory_budget: str | int | None = None, device: str | None = None,
          n_ctx: int | None = None, threads: int | None = None, kv_cache: str | None = None,
          context_overflow: str = "drop-turns", parallel: int = 1, ready: Callable[[str], None] | None = None) -> None:
    """Load `model` (default: the bundled SmolLM2) with `edgeai.load`'s options, then serve it over
    HTTP until interrupted (`edgeai serve`). api_key: required as a bearer token (None: open, which
    is why the default host is loopback); name: the model's name in the APIs (default: the file's
    stem); max_queue: requests waiting for the model before 503; max_connections: open connections;
    keep_alive: seconds the model stays loaded after its last request (< 0: for ever; ollama clients
    set it per request). parallel: requests decoded together in one batched step (sequence slots of
    the native engine, each with its own KV cache; other backends run one at a time); the rest wait
    in the queue. ready(url) is called once the server listens."""
    import uvicorn

    from edgeai.options import checked_int

    checked_int("port", port, minimum=0, maximum=65535)
    checked_int("max_queue", max_queue, minimum=1, maximum=4096)
    checked_int("max_connections", max_connections, minimum=1, maximum=65536)
    if model is None:
        from edgeai.paths import default_model_path

        model = default_model_path()
    config = ServerConfig(Path(model), dict(backend=backend, memory_budget=memory_budget, device=device, n_ctx=n_ctx,
                                            threads=threads, kv_cache=kv_cache, context_overflow=context_overflow,
                                            parallel=parallel),
                          name=name, api_key=api_key, max_queue=max_queue, keep_alive=keep_alive)
    app = create_app(config)
    asyncio.run(_preload(app))

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if ready is not None and self.started:
                ready(f"http://{host}:{self.servers[0].sockets[0].getsockname()[1] if port == 0 else port}")

    server = Server(uvicorn.Config(app, host=host, port=port, limit_concurrency=max_connections, log_level="warning",
                                   timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024))
    server.run()


async def _preload(app) -> None:
    """Load before listening, so a bad model fails at start-up, not at the first request."""
    await app.state.host.get()
    app.state.host.done(None)
