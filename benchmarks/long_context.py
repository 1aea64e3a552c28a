"""Long context in a fixed memory: perplexity over a text 16x the cache by context-overflow policy, and passkey retrieval.

SmolLM2 (the bundled GGUF, or --model) scores one long text (the license texts in site-packages, as
quant_vs_llamacpp.py builds its evaluation text offline; `--corpus python-docs`: Python's language
reference from the standard library; or --text), cut to --tokens tokens:

- "full": one cache holding the whole text (n_ctx = --tokens, at most the model's 8,192);
- for each cache size in --caches (default 256 and 512 positions, 1/32 and 1/16 of the text):
  - "sink-window (native)": edgeai's policy (`edgeai.context.ContextWindow`: the first 4 positions
    kept, an eighth of the window evicted per slide, keys re-rotated) in the native engine;
  - "sink-window (llama.cpp)": the same policy driving llama.cpp's own cache shift (seq_rm/seq_add),
    which separates the policy from the engine;
  - "llama.cpp context shift": llama.cpp's rule (llama-cli / llama-server: keep n_keep = 0 positions
    after the first BOS-less token, discard half of the rest when full) in llama.cpp;
  - "compact (native)": edgeai's compaction (`context_overflow="compact"`: sinks, the latest 32
    positions and, per layer and KV head, those the last 32 queries attend to most).

Every run reads the text in pieces of --chunk tokens (each piece's logits predict its next tokens,
scored by natural-log perplexity over every position after the first), making room before each piece
as its policy says. KV bytes per token of each KV cache type come from the engine.

Passkey retrieval (--passkey-fill filler sentences, about 25 tokens each): a five-digit number hidden
at --depths of a long filler text, then "What is the pass key? The pass key is"; greedy answer of 8
tokens, found when it contains the number. Read through `Model.generate` with (a) a cache holding the
whole prompt, (b) "compact" with a cache of a quarter of the prompt (each compaction scored by the
prompt's last 32 tokens, evaluated as a probe and dropped), (c) "sink-window" with the same cache.
Deterministic: no speed is measured.

    .venv/bin/python benchmarks/long_context.py [--tokens 8192] [--caches 256 512] [--chunk 32] [--skip-ppl]

report.json goes to ~/.cache/edgeai-bench/long-context (--work).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import cpu_model, kv_cache_sizes  # noqa: E402
from quant_vs_llamacpp import site_packages_licenses  # noqa: E402

KV_KINDS = ["f16", "q8_0", "q8_0/q4_0", "q4_0"]


def python_reference() -> str:
    """Python's language reference as plain text (the standard library's `pydoc_data.topics`, what
    `help("assert")` shows; sorted by topic): prose and grammar that repeats itself far less than
    the license texts, whose copies of the same licenses favour a cache that holds them all."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


CORPORA = {"licenses": site_packages_licenses, "python-docs": python_reference}


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


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(key: int, depth: float, n_fill: int) -> str:
    """The passkey test's prompt (Mohtashami and Jaggi 2023, as LongLoRA and others run it): `key`
    stated after `depth` of `n_fill` filler sentences, the question at the end."""
    before = int(n_fill * depth)
    return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n" + FILLER * before
            + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (n_fill - before)
            + "\nWhat is the pass key? The pass key is")


def passkey(path: Path, args: argparse.Namespace) -> list[dict]:
    """Found or not, per policy, depth and key (see the module)."""
    import edgeai

    rng = np.random.default_rng(args.seed)
    keys = [int(k) for k in rng.integers(10000, 100000, args.keys)]
    with edgeai.load(path, backend="native", n_ctx=64, threads=args.threads) as m:
        n_prompt = max(len(m.tokenize(passkey_prompt(k, d, args.passkey_fill))) for k in keys for d in args.depths)
    quarter = n_prompt // 4
    runs = [("full", n_prompt + 16, "drop-turns"), ("compact", quarter, "compact"), ("sink-window", quarter, "sink-window")]
    rows = []
    print(f"passkey: prompts of up to {n_prompt} tokens, depths {args.depths}, {args.keys} keys", flush=True)
    for name, n_ctx, policy in runs:
        with edgeai.load(path, backend="native", n_ctx=n_ctx, threads=args.threads, context_overflow=policy) as m:
            for depth in args.depths:
                for key in keys:
                    m.backend.truncate(0)
                    m.context.kept(0)
                    answer = str(m.generate(passkey_prompt(key, depth, args.passkey_fill), max_tokens=8, temperature=0))
                    rows.append({"policy": name, "cache": n_ctx, "depth": depth, "key": key, "found": str(key) in answer,
                                 "answer": answer})
                    print(f"  {name:12s} cache {n_ctx:5d} depth {depth:.1f} {key}: {'found' if str(key) in answer else 'missed'} "
                          f"({answer!r})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--text", type=Path, default=None, help="a UTF-8 text file (default: --corpus)")
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="licenses",
                    help="the text this benchmark brings: site-packages' license texts, or Python's language reference")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--caches", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgeai-bench" / "long-context")
    ap.add_argument("--passkey-fill", type=int, default=80, help="filler sentences of the passkey prompt")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--keys", type=int, default=2, help="passkeys tried at each depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ppl", action="store_true", help="the passkey test only")
    ap.add_argument("--skip-passkey", action="store_true")
    args = ap.parse_args()

    from edgeai.paths import default_model_path

    path = args.model or default_model_path()
    report = {"model": path.name, "cpu": cpu_model()}
    if not args.skip_ppl:
        report.update(perplexity(path, args))
    if not args.skip_passkey:
        report["passkey"] = passkey(path, args)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "report.json").write_text(json.dumps(report, indent=2))
    if "rows" in report:
        print("\n| policy | cache | perplexity | vs full cache |\n|---|---|---|---|")
        for r in report["rows"]:
            print(f"| {r['policy']} | {r['cache']} | {r['ppl']:.3f} | {100 * r['vs_full']:+.2f}% |")
        print("\nKV bytes per token: " + ", ".join(f"{k} {v:,.0f}" for k, v in report["kv_bytes_per_token"].items()))
    if "passkey" in report:
        rows = report["passkey"]
        print("\n| passkey | cache | " + " | ".join(f"depth {d}" for d in args.depths) + " |\n|---|---|"
              + "---|" * len(args.depths))
        for name in dict.fromkeys(r["policy"] for r in rows):
            mine = [r for r in rows if r["policy"] == name]
            cells = [f"{sum(r['found'] for r in mine if r['depth'] == d)}/{sum(r['depth'] == d for r in mine)}"
                     for d in args.depths]
            print(f"| {name} | {mine[0]['cache']} | " + " | ".join(cells) + " |")
    print(f"report: {args.work / 'report.json'}")


def perplexity(path: Path, args: argparse.Namespace) -> dict:
    """The perplexity rows and KV bytes per token (see the module)."""
    from edgeai.context import OBSERVE, ContextWindow
    from edgeai.runtimes.llamacpp import LlamaCppBackend
    from edgeai.runtimes.native import NativeBackend

    text = args.text.read_text(encoding="utf-8") if args.text else CORPORA[args.corpus]()
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
    native.close()
    kv_bytes = {kind: kv_cache_sizes(path, kind)[0] for kind in KV_KINDS}  # per position (4-bit: + fixed f16 rows)
    for cache in args.caches:
        b = NativeBackend(path, n_ctx=cache, threads=args.threads)
        run("sink-window (native)", cache, b, ContextWindow("sink-window").make_room)
        b.close()
        b = NativeBackend(path, n_ctx=cache, threads=args.threads, observe=OBSERVE)
        run("compact (native)", cache, b, ContextWindow("compact").make_room)
        b.close()
        b = LlamaCppBackend(path, n_ctx=cache, threads=args.threads)
        run("sink-window (llama.cpp)", cache, b, ContextWindow("sink-window").make_room)
        run("llama.cpp context shift", cache, b, llama_cpp_shift())
        b.close()
    full = rows[0]["ppl"]
    for r in rows:
        r["vs_full"] = round(r["ppl"] / full - 1, 4)
    return {"tokens": len(tokens), "chunk": args.chunk, "rows": rows, "kv_bytes_per_token": kv_bytes}


if __name__ == "__main__":
    main()
