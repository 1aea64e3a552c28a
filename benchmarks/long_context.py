"""Long context in a fixed memory: perplexity over a text 16x the cache, by context-overflow policy.

SmolLM2 (the bundled GGUF, or --model) scores one long text (the license texts in site-packages, as
quant_vs_llamacpp.py builds its evaluation text offline; or --text), cut to --tokens tokens:

- "full": one cache holding the whole text (n_ctx = --tokens, at most the model's 8,192);
- for each cache size in --caches (default 256 and 512 positions, 1/32 and 1/16 of the text):
  - "sink-window (native)": edgeai's policy (`edgeai.context.ContextWindow`: the first 4 positions
    kept, an eighth of the window evicted per slide, keys re-rotated) in the native engine;
  - "sink-window (llama.cpp)": the same policy driving llama.cpp's own cache shift (seq_rm/seq_add),
    which separates the policy from the engine;
  - "llama.cpp context shift": llama.cpp's rule (llama-cli / llama-server: keep n_keep = 0 positions
    after the first BOS-less token, discard half of the rest when full) in llama.cpp.

Every run reads the text in pieces of --chunk tokens (each piece's logits predict its next tokens,
scored by natural-log perplexity over every position after the first), making room before each piece
as its policy says. KV bytes per token of each KV cache type come from the engine. Deterministic: no
speed is measured. The compaction policy and the passkey test are not built yet.

    .venv/bin/python benchmarks/long_context.py [--tokens 8192] [--caches 256 512] [--chunk 32]

report.json goes to ~/.cache/edgeai-bench/long-context (--work).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quant_vs_llamacpp import site_packages_licenses  # noqa: E402

KV_KINDS = ["f16", "q8_0", "q8_0/q4_0", "q4_0"]


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row of logits [n, V] (float64 for the sums)."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x[np.arange(len(targets)), targets] - lse


def score(backend, tokens: list[int], chunk: int, make_room) -> dict:
    """Perplexity of `tokens` read through `backend` in pieces of `chunk`, `make_room(backend, n)`
    called before each piece."""
    backend.truncate(0)
    nll, n, pos = 0.0, 0, 0
    while pos < len(tokens) - 1:
        piece = tokens[pos:pos + chunk]
        if not make_room(backend, len(piece)):
            raise RuntimeError("the policy could not make room")
        logits = backend.eval_logits(piece)
        targets = np.asarray(tokens[pos + 1:pos + 1 + len(piece)])
        nll -= float(log_softmax_at(logits[:len(targets)], targets).sum())
        n += len(targets)
        pos += len(piece)
    return {"ppl": float(np.exp(nll / n)), "scored": n, "fill": backend.n_past}


def llama_cpp_shift(n_keep: int = 0):
    """llama.cpp's context shift (llama-cli, llama-server): when the next piece does not fit,
    discard half of the positions after the first n_keep, the rest moved down."""
    def make_room(backend, needed: int) -> bool:
        while backend.n_ctx - backend.n_past < needed:
            n_discard = (backend.n_past - n_keep) // 2
            if n_discard <= 0:
                return False
            backend.evict(n_keep, n_keep + n_discard)
        return True
    return make_room


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--text", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--caches", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgeai-bench" / "long-context")
    args = ap.parse_args()

    from edgeai.context import ContextWindow
    from edgeai.paths import default_model_path
    from edgeai.runtimes.llamacpp import LlamaCppBackend
    from edgeai.runtimes.native import NativeBackend

    path = args.model or default_model_path()
    text = args.text.read_text(encoding="utf-8") if args.text else site_packages_licenses()
    native = NativeBackend(path, n_ctx=args.tokens, threads=args.threads)
    tokens = native.tokenize(text)[:args.tokens]
    if len(tokens) < args.tokens:
        sys.exit(f"the text has only {len(tokens)} tokens; give a longer --text")
    print(f"{path.name}: {len(tokens)} tokens, caches {args.caches}, pieces of {args.chunk}", flush=True)
    rows = []

    def run(name: str, cache: int, backend, make_room) -> None:
        t0 = time.perf_counter()
        r = score(backend, tokens, args.chunk if cache < args.tokens else 256, make_room)
        rows.append({"policy": name, "cache": cache, **r, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {name:28s} cache {cache:5d}: ppl {r['ppl']:.3f}", flush=True)

    fits = lambda b, n: b.n_ctx - b.n_past >= n  # noqa: E731 (the full cache never needs room)
    run("full", args.tokens, native, fits)
    kv_bytes = {"f16": native.stats().extra["kv_bytes"] / args.tokens}
    native.close()
    for kind in KV_KINDS[1:]:
        b = NativeBackend(path, n_ctx=512, threads=args.threads, kv_cache=kind)
        kv_bytes[kind] = b.stats().extra["kv_bytes"] / 512
        b.close()
    for cache in args.caches:
        b = NativeBackend(path, n_ctx=cache, threads=args.threads)
        run("sink-window (native)", cache, b, ContextWindow("sink-window").make_room)
        b.close()
        b = LlamaCppBackend(path, n_ctx=cache, threads=args.threads)
        run("sink-window (llama.cpp)", cache, b, ContextWindow("sink-window").make_room)
        run("llama.cpp context shift", cache, b, llama_cpp_shift())
        b.close()
    full = rows[0]["ppl"]
    for r in rows:
        r["vs_full"] = round(r["ppl"] / full - 1, 4)
    report = {"model": path.name, "tokens": len(tokens), "chunk": args.chunk, "cpu": platform.processor() or platform.machine(),
              "rows": rows, "kv_bytes_per_token": kv_bytes}
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "report.json").write_text(json.dumps(report, indent=2))
    print("\n| policy | cache | perplexity | vs full cache |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['cache']} | {r['ppl']:.3f} | {100 * r['vs_full']:+.2f}% |")
    print("\nKV bytes per token: " + ", ".join(f"{k} {v:,.0f}" for k, v in kv_bytes.items()))
    print(f"report: {args.work / 'report.json'}")


if __name__ == "__main__":
    main()
