"""What one engine call costs for several tokens, against one: a batched decode step of B sequences
(`Engine.step_batch`, what `edgeai serve --parallel` and `Model.batch()` run) and a verification of T
tokens of one sequence (`Engine.eval`, what speculative decoding runs). Both are the figures the
packed kernels' prefetch changed (README: batched decoding, speculative decoding).

    .venv/bin/python benchmarks/batch_step.py [--model FILE] [--threads 1 2] [--batches 1 2 4 8] [--tokens 1 2 4 8 9]

Each figure is the median of --repeats timings (a batched step: the mean over --steps steps; a
verification: one call, then the cache is cut back); the ratio is against the one-token figure of the
same run. Run it on a quiet machine and say its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import cpu_model, model_file  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def batched_steps(engine, prompt: list[int], batches: list[int], steps: int, repeats: int) -> dict[int, float]:
    """Seconds per batched decode step of B sequences, each after the same prompt."""
    out = {}
    for B in batches:
        times = []
        for _ in range(repeats):
            for s in range(B):
                engine.truncate(len(prompt), s)
            tokens = [[100 + s] for s in range(B)]
            t0 = time.perf_counter()
            for _ in range(steps):
                tokens = [[t] for t in engine.step_batch(list(range(B)), tokens, [True] * B, [None] * B)]
            times.append((time.perf_counter() - t0) / steps)
        out[B] = float(np.median(times))
    return out


def verifications(engine, prompt: list[int], sizes: list[int], repeats: int) -> dict[int, float]:
    """Seconds per evaluation of T tokens after the prompt in slot 0 (then cut back)."""
    out = {}
    for T in sizes:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.eval(list(range(100, 100 + T)), False, None, 0)
            times.append(time.perf_counter() - t0)
            engine.truncate(len(prompt), 0)
        out[T] = float(np.median(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: SmolLM2 Q4_0 made as the other benchmarks do)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 9])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    from edgeai.runtimes.native import NativeBackend

    path = args.model or model_file("q4_0")
    print(f"{path.name}; {cpu_model()}; load {os.getloadavg()[0]:.2f}", flush=True)
    for threads in args.threads:
        backend = NativeBackend(path, n_ctx=512, threads=threads, parallel=max(args.batches))
        engine = backend._engine
        prompt = backend.tokenize(PROMPT)
        for s in range(max(args.batches)):
            engine.eval(prompt, False, None, s)
        steps = batched_steps(engine, prompt, args.batches, args.steps, args.repeats)
        verify = verifications(engine, prompt, args.tokens, args.repeats)
        backend.close()
        print(f"{threads} thread(s): batched step of B sequences, ms (steps of one): "
              + ", ".join(f"B={b} {1e3 * s:.2f} ({s / steps[args.batches[0]]:.2f})" for b, s in steps.items()))
        print(f"{threads} thread(s): verification of T tokens, ms (steps of one): "
              + ", ".join(f"T={t} {1e3 * s:.2f} ({s / verify[args.tokens[0]]:.2f})" for t, s in verify.items()), flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
