"""`edgeai.load`: an artifact in the backend that runs it, as a `Model`; `edgeai.plan`: its memory
split, without loading; `edgeai.run`: one answer from it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeai.model import FinishReason, Model, Timings

log = logging.getLogger(__name__)


def load(path: str | Path | None = None, *, backend: str = "auto", memory_budget: str | int | None = None,
         device: str | None = None, n_ctx: int | None = None, threads: int | None = None,
         kv_cache: str | None = None, speculative: str | Path | None = None, draft_tokens: int | None = None,
         context_overflow: str = "drop-turns", parallel: int = 1) -> Model:
    """Load an artifact (a .gguf file or an ONNX folder; None: the bundled SmolLM2) as a `Model`.

    backend: "auto" (native where it runs the file, else llama.cpp for GGUF, onnxruntime for ONNX),
    or one of "native", "llama.cpp", "onnxruntime".
    memory_budget: "1.5GiB", "800MB", "60%" (of the device's memory) or bytes; default: the
    device profile's budget when `device` is given, else none.
    device: a profile name (`edgeai devices`): sets the default threads and memory budget.
    kv_cache: the KV cache's element type, "f16" (default), "q8_0" (about half the memory) or "q4_0"
    (about a quarter), or keys/values of two of them such as "q8_0/q4_0" (native and llama.cpp
    backends; `runtimes.base.kv_cache_type`).
    speculative: speculative decoding (`edgeai.speculative`, native backend only), "lookup" (drafts
    from n-grams of the prompt and the text so far), "self" (the model through a subset of its
    layers) or a draft model's path (a GGUF with the same vocabulary); draft_tokens: the most tokens
    drafted per verification (1..14, default 8; the draft length adapts below it). Output is the
    same as without it (greedy: token for token).
    context_overflow: what a full KV cache does (`edgeai.context`): "drop-turns" (default; a
    generation stops with finish reason "context", the chat REPL drops the oldest turns) or
    "sink-window" (the first tokens and the latest stay, the oldest others are evicted and
    generation goes on in the same memory; native and llama.cpp backends) or "compact" (the first
    and latest tokens stay, and per layer and head those the latest queries attend to most: a long
    prompt's question keeps what it asks about; native backend, models without sliding windows).
    parallel: sequence slots (1..64; native backend), each with its own KV cache of n_ctx positions
    (the memory plan counts them all): `Model.batch()` then decodes that many requests together,
    one batched engine step for all, as `edgeai serve --parallel N` does. Another backend runs one
    sequence (requests queue), said in a warning.
    """
    from edgeai.context import ContextOverflow
    from edgeai.options import checked_choice
    from edgeai.runtimes.registry import header_of, resolve
    from edgeai.speculative import cannot_speculate, memory_of, speculative_options, speculator_for

    from edgeai.runtimes.native import checked_parallel

    options = speculative_options(speculative, draft_tokens)  # checked before the (slow) load
    parallel = checked_parallel(parallel)
    if options is not None and parallel > 1:
        from edgeai.errors import OptionError

        raise OptionError(f"speculative decoding drafts for one sequence; parallel={parallel} decodes several in one "
                          "batched step: choose one of them (parallel=1, or no speculative)")
    overflow = checked_choice("context_overflow", context_overflow, ContextOverflow)
    path, budget, threads, profile = _resolve(path, memory_budget, device, threads)
    header = header_of(Path(path))  # read once: choosing the backend and loading it share it
    cls = resolve(Path(path), backend, header)
    planned = {}
    if options is not None:
        if cls.name != "native":
            raise cannot_speculate(cls.name)
        planned = {"speculative": memory_of(options)}  # the memory plan counts the draft and the verification
    if overflow is ContextOverflow.COMPACT and cls.name == "native":
        from edgeai.context import OBSERVE

        planned["observe"] = OBSERVE  # the engine keeps the latest queries for compaction (the plan counts them)
    if parallel > 1:
        if cls.name == "native":
            planned["parallel"] = parallel  # the memory plan counts every slot's KV cache
        else:
            log.warning("the %s backend decodes one sequence at a time: parallel=%d is "
                                                "ignored, requests run one after another", cls.name, parallel)
    engine = cls(Path(path), n_ctx=n_ctx, threads=threads, memory_budget=budget, kv_cache=kv_cache, header=header,
                 **planned)
    try:
        speculator = speculator_for(engine, options)
        return Model(engine, device=profile, memory_budget=budget, speculator=speculator, context_overflow=overflow)
    except BaseException:
        engine.close()
        raise


def plan(path: str | Path | None = None, *, memory_budget: str | int | None = None, device: str | None = None,
         n_ctx: int | None = None, threads: int | None = None, kv_cache: str | None = None,
         speculative: str | Path | None = None, draft_tokens: int | None = None, parallel: int = 1):
    """How loading `path` in the native engine would split the memory budget, without loading it
    (`edgeai run --plan`): a `runtimes.plan.MemoryPlan` (with speculative=, the draft model and the
    verification's logits too). Raises BudgetError when it cannot fit. Arguments as for `load`."""
    from edgeai.speculative import memory_of, speculative_options

    options = speculative_options(speculative, draft_tokens)
    from edgeai.errors import BackendError
    from edgeai.runtimes.native import NativeBackend

    from edgeai.runtimes.registry import header_of

    path, budget, threads, _ = _resolve(path, memory_budget, device, threads)
    header = header_of(Path(path))
    reason = NativeBackend.can_run(Path(path), header)
    if reason:
        raise BackendError(f"memory plans are made for the native engine, which cannot run this file: {reason}")
    return NativeBackend.plan_for(Path(path), n_ctx=n_ctx, threads=threads, memory_budget=budget, kv_cache=kv_cache,
                                  header=header, speculative=memory_of(options), parallel=parallel)


@dataclass(frozen=True)
class RunResult:
    """One answer from `run`."""

    text: str
    finish_reason: FinishReason
    chat_template: bool  # the prompt went in as the user's turn of the model's chat template (else raw completion)
    backend: str  # the backend that ran it ("auto" resolved)
    timings: Timings
    incomplete: bool = False  # a constraint was asked for and the text does not satisfy it (max_tokens ran out)


def run(model: str | Path | None, prompt: str, *, raw: bool = False, max_tokens: int = 256, temperature: float = 0.8,
        seed: int | None = None, backend: str = "auto", memory_budget: str | int | None = None,
        device: str | None = None, n_ctx: int | None = None, threads: int | None = None,
        kv_cache: str | None = None, grammar: str | None = None, json_schema: Any = None, regex: str | None = None,
        on_text: Callable[[str], None] | None = None, speculative: str | Path | None = None,
        draft_tokens: int | None = None, context_overflow: str = "drop-turns") -> RunResult:
    """Load `model`, answer `prompt` once and close it (`edgeai run`). The prompt is the user's turn
    in the model's chat template where it has one (as ollama run, llama-cli and mlx_lm.generate do);
    raw, or a model without a template: plain completion of the text. grammar (GBNF text),
    json_schema (a dict) or regex: structured output, as for `Model.stream`. on_text: called with
    each piece of text as it is generated. Other arguments as for `load` and `Model.stream`."""
    constraint = {"grammar": grammar, "json_schema": json_schema, "regex": regex}
    with load(model, backend=backend, memory_budget=memory_budget, device=device, n_ctx=n_ctx, threads=threads,
              kv_cache=kv_cache, speculative=speculative, draft_tokens=draft_tokens,
              context_overflow=context_overflow) as m:
        chat = not raw and not m.plain_chat
        if chat:
            chunks = m.chat([{"role": "user", "content": prompt}], stream=True, max_tokens=max_tokens,
                            temperature=temperature, seed=seed, **constraint)
        else:
            chunks = m.stream(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, **constraint)
        pieces, last = [], None
        for chunk in chunks:
            pieces.append(chunk.text)
            last = chunk
            if on_text is not None:
                on_text(chunk.text)
        assert last is not None  # a stream ends with a chunk that carries its finish reason
        return RunResult("".join(pieces), last.finish_reason, chat, m.backend.name, last.timings, last.incomplete)


def _resolve(path, memory_budget, device, threads):
    """(path, budget in bytes or None, threads or None, device profile or None) from load()'s arguments."""
    from edgeai.budget import parse_budget

    profile = None
    if device is not None:
        from edgeai.devices import get_profile

        profile = get_profile(device)
    if path is None:
        from edgeai.paths import default_model_path

        path = default_model_path()
    total = profile.memory_bytes if profile is not None else None
    budget = parse_budget(memory_budget, total_memory=total)
    if budget is None and profile is not None:
        budget = profile.default_budget
    if threads is None and profile is not None:
        threads = profile.threads
    if threads is not None:
        from edgeai.devices import checked_threads

        threads = checked_threads(threads)
    return path, budget, threads, profile
