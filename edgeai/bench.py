"""`edgeai bench`: prefill and decode tokens/s, time to first token and peak memory of backends
on the same file, through the `Backend` protocol only (so any backend can be measured).

Each backend runs in its own process (`python -m edgeai.bench`), so that its peak
memory is its own and one engine's caches do not warm another's. Within a process: one warm-up,
then `repeats` runs of (empty cache -> prefill `n_prompt` tokens -> `n_gen` greedy decode steps);
the figures are the medians of the runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeai.errors import BackendError

# Prompt text: prose and code, repeated to the number of tokens asked for.
BENCH_TEXT = (
    "The quick brown fox jumps over the lazy dog while the committee discusses the budget for next year. "
    "def mean(xs):\n    return sum(xs) / len(xs)\n"
    "Small machines run language models when the weights are quantized and the memory is planned. "
)


@dataclass(frozen=True)
class BenchResult:
    """Medians over `runs` runs of one backend on one file."""

    backend: str
    path: str
    threads: int
    n_prompt: int
    n_gen: int
    runs: int
    prefill_tps: float
    decode_tps: float
    ttft_s: float  # prefill of n_prompt tokens plus the first sample
    peak_rss_bytes: int  # the whole worker process at its peak (Python included)
    load_rss_bytes: int  # resident memory the load and the runs added to the process
    speculative: str | None = None  # the drafter (speculative decoding), None for plain decode
    acceptance_rate: float | None = None  # drafted tokens accepted / drafted
    mean_accepted_length: float | None = None  # accepted tokens per verification

    def to_json(self) -> dict:
        return asdict(self)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def timed_generation(backend, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation from an empty cache: `prompt`
    in one step, then `n_gen` single-token steps. The backend's sampling must already be set."""
    backend.truncate(0)
    t0 = time.perf_counter()
    tok = backend.step(prompt)
    t1 = time.perf_counter()
    for _ in range(n_gen):
        tok = backend.step([tok])
    return t1 - t0, time.perf_counter() - t1


def timed_stream(model, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """As `timed_generation`, through `Model.stream` (speculative decoding runs there): `n_gen`
    tokens after the first, greedy, from an empty cache."""
    model.reset()
    chunks = model.stream(prompt, max_tokens=n_gen + 1, temperature=0)
    t0 = time.perf_counter()
    next(chunks)
    t1 = time.perf_counter()
    for _ in chunks:
        pass
    return t1 - t0, time.perf_counter() - t1


def measure(path: Path, backend: str, *, threads: int, n_prompt: int, n_gen: int, repeats: int,
            memory_budget: int | None = None, kv_cache: str | None = None, speculative: str | None = None,
            draft_tokens: int | None = None) -> BenchResult:
    """Run the benchmark of one backend in this process."""
    from edgeai.api import load
    from edgeai.runtimes.base import GREEDY

    before = _rss()
    with load(path, backend=backend, threads=threads, n_ctx=n_prompt + n_gen + 16, memory_budget=memory_budget,
              kv_cache=kv_cache, speculative=speculative, draft_tokens=draft_tokens) as model:
        be = model.backend
        text_tokens = model.tokenize(BENCH_TEXT, add_special=False)
        prompt = model.tokenize("", add_special=True)[:1]
        while len(prompt) < n_prompt:
            prompt += text_tokens[: n_prompt - len(prompt)]
        be.set_sampling(GREEDY)
        prefill, decode, ttft = [], [], []
        for run in range(repeats + 1):  # run 0 warms caches and page faults in, and is not counted
            if speculative:
                t_prefill, t_decode = timed_stream(model, prompt, n_gen)
            else:
                t_prefill, t_decode = timed_generation(be, prompt, n_gen)
            if run:
                ttft.append(t_prefill)
                prefill.append(n_prompt / t_prefill)
                decode.append(n_gen / t_decode)
        spec = model.stats().extra.get("speculative") or {}
        return BenchResult(be.name, str(path), threads, n_prompt, n_gen, repeats, statistics.median(prefill),
                           statistics.median(decode), statistics.median(ttft), _peak_rss(), _rss() - before,
                           spec.get("drafter"), spec.get("acceptance_rate"), spec.get("mean_accepted_length"))


@dataclass(frozen=True)
class Roofline:
    """The decode speed memory bandwidth allows on this machine: bytes read per token (weights and
    the KV cache at the benchmark's mean context) / measured memory bandwidth."""

    bytes_per_token: float
    memory_bandwidth: float  # bytes/s, `devices.detect.probe_memory_bandwidth`
    decode_tps: float


def roofline(path: str | Path, n_past: int) -> Roofline | None:
    """The decode roofline of a GGUF file (None for other artifacts)."""
    path = Path(path)
    if not path.is_file():
        return None
    from edgeai.devices.detect import probe_memory_bandwidth
    from edgeai.fit import bytes_per_token, gguf_shape_and_weights

    shape, weights = gguf_shape_and_weights(path)
    per_token = bytes_per_token(shape, weights, n_past)
    bandwidth = probe_memory_bandwidth()
    return Roofline(per_token, bandwidth, bandwidth / per_token)


def bench(model: str | Path, backend: str | Sequence[str] = "auto", *, threads: int | None = None, n_prompt: int = 128,
          n_gen: int = 32, repeats: int = 3, memory_budget: int | str | None = None,
          kv_cache: str | None = None, speculative: str | None = None, draft_tokens: int | None = None) -> list[BenchResult]:
    """Benchmark `model` (a .gguf file or ONNX folder) in each backend of `backend` (one name or
    several; same file, same threads, same budget, same KV cache type), each in a fresh process.
    "auto" stands for the backend `edgeai.load` would pick (the result names the real one);
    memory_budget: bytes or "1.5GiB", "60%" (`edgeai.budget`); speculative, draft_tokens: as for
    `edgeai.load` (decode then runs through `Model.stream`; the prompt is repetitive text, which
    prompt lookup drafts well). Results are in `backend`'s order."""
    from edgeai.budget import parse_budget
    from edgeai.devices import checked_threads
    from edgeai.options import checked_int
    from edgeai.runtimes.registry import header_of, resolve

    path = Path(model)
    header = header_of(path)  # one parse for every backend's check
    names = [backend] if isinstance(backend, str) else list(backend)
    backends = [resolve(path, header=header).name if b == "auto" else b for b in names]
    memory_budget = parse_budget(memory_budget)
    threads = checked_threads(threads)
    checked_int("n_prompt (--n-prompt)", n_prompt, minimum=1, maximum=2**20)
    checked_int("n_gen (--n-gen)", n_gen, minimum=1, maximum=2**20)
    checked_int("repeats (--repeats)", repeats, minimum=1, maximum=1000, why="each run is a full prefill and decode")
    from edgeai.speculative import speculative_options

    speculative_options(speculative, draft_tokens)  # a clear error now, before any process is started
    for name in backends:
        resolve(path, name, header)
    results = []
    for name in backends:
        # -I: the worker must not import a source tree from the current folder
        cmd = [sys.executable, "-I", "-m", "edgeai.bench", str(path), name, str(threads), str(n_prompt), str(n_gen),
               str(repeats), str(memory_budget or 0), kv_cache or "f16", str(speculative or ""), str(draft_tokens or 0)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BackendError(f"benchmarking {name} on {path} failed: {tail}")
        results.append(BenchResult(**json.loads(proc.stdout.strip().splitlines()[-1])))
    return results


if __name__ == "__main__":  # the worker: one backend, one JSON line on stdout
    file, name, n_threads, prompt_len, gen_len, n_runs, budget, kv, spec, n_draft = sys.argv[1:11]
    res = measure(Path(file), name, threads=int(n_threads), n_prompt=int(prompt_len), n_gen=int(gen_len),
                  repeats=int(n_runs), memory_budget=int(budget) or None, kv_cache=kv, speculative=spec or None,
                  draft_tokens=int(n_draft) or None)
    print(json.dumps(res.to_json()))
