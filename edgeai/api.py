"""`edgeai.load`: an artifact in the backend that runs it, as a `Model`."""

from __future__ import annotations

from pathlib import Path

from edgeai.model import Model


def load(path: str | Path | None = None, *, backend: str = "auto", memory_budget: str | int | None = None,
         device: str | None = None, n_ctx: int | None = None, threads: int | None = None,
         kv_cache: str | None = None) -> Model:
    """Load an artifact (a .gguf file or an ONNX folder; None: the bundled SmolLM2) as a `Model`.

    backend: "auto" (native where it runs the file, else llama.cpp for GGUF, onnxruntime for ONNX),
    or one of "native", "llama.cpp", "onnxruntime".
    memory_budget: "1.5GiB", "800MB", "60%" (of the device's memory) or bytes; default: the
    device profile's budget when `device` is given, else none.
    device: a profile name (`edgeai devices`): sets the default threads and memory budget.
    kv_cache: the KV cache's element type, "f16" (default), "q8_0" (about half the memory) or "q4_0"
    (about a quarter), or keys/values of two of them such as "q8_0/q4_0" (native and llama.cpp
    backends; `runtimes.base.kv_cache_type`).
    """
    from edgeai.runtimes.registry import header_of, resolve

    path, budget, threads, profile = _resolve(path, memory_budget, device, threads)
    header = header_of(Path(path))  # read once: choosing the backend and loading it share it
    cls = resolve(Path(path), backend, header)
    engine = cls(Path(path), n_ctx=n_ctx, threads=threads, memory_budget=budget, kv_cache=kv_cache, header=header)
    return Model(engine, device=profile, memory_budget=budget)


def plan(path: str | Path | None = None, *, memory_budget: str | int | None = None, device: str | None = None,
         n_ctx: int | None = None, threads: int | None = None, kv_cache: str | None = None):
    """How loading `path` in the native engine would split the memory budget, without loading it
    (`edgeai run --plan`): a `runtimes.plan.MemoryPlan`. Raises BudgetError when it cannot fit.
    Arguments as for `load`."""
    from edgeai.errors import BackendError
    from edgeai.runtimes.native import NativeBackend

    from edgeai.runtimes.registry import header_of

    path, budget, threads, _ = _resolve(path, memory_budget, device, threads)
    header = header_of(Path(path))
    reason = NativeBackend.can_run(Path(path), header)
    if reason:
        raise BackendError(f"memory plans are made for the native engine, which cannot run this file: {reason}")
    return NativeBackend.plan_for(Path(path), n_ctx=n_ctx, threads=threads, memory_budget=budget, kv_cache=kv_cache,
                                  header=header)


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
