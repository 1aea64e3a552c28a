"""KV cache types in the native engine: bytes per token and perplexity, f16 against the quantized caches.

For each KV cache type (f16, q8_0, q4_0 and mixed keys/values such as q8_0/q4_0) on SmolLM2-135M (the
bundled GGUF, or --model): the cache's bytes per token of context (all layers, keys and values) and
what does not grow with it (a 4-bit half's f16 rows of the latest 64 positions, 2.8 MiB for q4_0), and
`edgeai eval` with the native engine scoring the model under that cache, against the same file in
llama.cpp with an F32 cache:

    edgeai eval MODEL -r MODEL --text TEXT --ctx CTX --chunks N --backend native --kv-cache KIND

Perplexity is llama-perplexity's (the second half of each chunk scored); KLD is against the F32-cache
reference, so the f16 row shows the engine's own distance from llama.cpp (int8 activations) and the
other rows add their cache's rounding. The text (as quant_vs_llamacpp.py makes its evaluation text,
offline): the license texts in site-packages, or --text. Every number is deterministic; no speed is
measured.

    .venv/bin/python benchmarks/kv_cache.py --ctx 1024 --chunks 16 [--llama-cpp]

--llama-cpp also scores llama.cpp's own caches of the same types (flash attention, which its
quantized V caches need). report.json goes to ~/.cache/edgeai-bench/kv-cache (--work).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import kv_cache_sizes  # noqa: E402
from quant_vs_llamacpp import site_packages_licenses, write_text  # noqa: E402

KINDS = ["f16", "q8_0", "f16/q4_0", "q8_0/q4_0", "q4_0"]  # largest first
LLAMA_CPP_KINDS = ["f16", "q8_0", "q8_0/q4_0", "q4_0"]


def main() -> None:
    from edgeai.evaluate import evaluate
    from edgeai.paths import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF the native engine runs (default: the bundled SmolLM2)")
    ap.add_argument("--text", type=Path, default=None, help="evaluation text (default: site-packages license texts)")
    ap.add_argument("--ctx", type=int, default=1024, help="tokens per chunk (the second half is scored)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", action="store_true", help="also score llama.cpp's caches of the same types")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/edgeai-bench/kv-cache")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    model = (args.model or default_model_path()).resolve()
    text = write_text(args.work / "eval.txt", args.text, site_packages_licenses)
    f16_bytes, _ = kv_cache_sizes(model, "f16")

    rows = []
    runs = [("native", k) for k in KINDS] + ([("llama.cpp", k) for k in LLAMA_CPP_KINDS] if args.llama_cpp else [])
    for backend, kind in runs:
        r = evaluate(model, model, text, n_ctx=args.ctx, n_chunks=args.chunks, threads=args.threads, backend=backend,
                     kv_cache=kind)
        per_token, fixed = kv_cache_sizes(model, kind)
        rows.append({"backend": backend, "kv_cache": kind, "bytes_per_token": per_token, "fixed_bytes": fixed if backend == "native" else 0,
                     "of_f16": per_token / f16_bytes, "ppl": r.ppl, "ref_ppl": r.ref_ppl, "kld_mean": r.kld_mean,
                     "kld_p99": r.kld_p99, "top1": r.top1, "n_tokens": r.n_tokens})
        print(f"{backend:9s} {kind:10s} {per_token:6d} B/token ({per_token / f16_bytes:5.1%} of f16)"
              + (f" + {fixed / 2**20:.2f} MiB of f16 rows" if fixed and backend == "native" else "") + f"  ppl {r.ppl:8.4f}  "
              f"KLD {r.kld_mean:.5f} (p99 {r.kld_p99:.4f})  top-1 {r.top1:.2%}", flush=True)

    print(f"\n{model.name}, {text.name}: {rows[0]['n_tokens']} scored tokens ({args.chunks} chunks of {args.ctx}); "
          f"reference: llama.cpp, F32 cache, ppl {rows[0]['ref_ppl']:.4f}")
    for backend in dict.fromkeys(r["backend"] for r in rows):
        base = next(r for r in rows if r["backend"] == backend and r["kv_cache"] == "f16")
        for r in rows:
            if r["backend"] == backend:
                print(f"  {backend:9s} {r['kv_cache']:10s} {r['bytes_per_token']:6d} B/token  ppl {r['ppl']:8.4f}  "
                      f"{r['ppl'] / base['ppl'] - 1:+7.2%} vs its f16 cache")
    report = {"model": str(model), "text": str(text), "ctx": args.ctx, "chunks": args.chunks, "rows": rows}
    (args.work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
