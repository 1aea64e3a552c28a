"""Gemma 3 270M (Q4_K_M, the optional `gemma3` extra): the native engine against llama.cpp.

Run by hand (never by tests), on a quiet machine:

    .venv/bin/python benchmarks/gemma3.py [--rounds 3] [--threads 1 2] [--repeats 5] [--gen-tokens 64]

Each round runs `edgeai bench FILE --backend llama.cpp --backend native -t T --repeats R
--gen-tokens N --json` in a child for every thread count, so each ratio is native / llama.cpp of
the same run; the table gives the median over rounds of prefill and decode tokens/s and of the
ratios (goals, as for SmolLM2: decode at least 1.25x, prefill at least 1.0x), with the CPU model and
the load average before and after (a figure taken above ~2.5 on 2 cores is noise). Without the
extra it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import cpu_model  # noqa: E402

EDGEAI = str(Path(sys.executable).parent / "edgeai")




def one_run(path: Path, threads: int, repeats: int, gen: int) -> dict:
    out = subprocess.run([EDGEAI, "bench", str(path), "--backend", "llama.cpp", "--backend", "native", "-t", str(threads),
                          "--repeats", str(repeats), "--gen-tokens", str(gen), "--json"],
                         check=True, capture_output=True, text=True).stdout
    theirs, ours = json.loads(out)["results"]
    return {"llama_prefill": theirs["prefill_tps"], "llama_decode": theirs["decode_tps"],
            "prefill": ours["prefill_tps"], "decode": ours["decode_tps"],
            "prefill_ratio": ours["prefill_tps"] / theirs["prefill_tps"],
            "decode_ratio": ours["decode_tps"] / theirs["decode_tps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()
    from edgeai.errors import CheckpointError
    from edgeai.paths import gemma3_model_path

    try:
        path = gemma3_model_path()
    except CheckpointError as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        sys.exit(2)
    load_before = os.getloadavg()[0]
    runs: dict[int, list[dict]] = {t: [] for t in args.threads}
    for rnd in range(args.rounds):
        for t in args.threads:
            r = one_run(path, t, args.repeats, args.gen_tokens)
            runs[t].append(r)
            print(f"round {rnd + 1} t={t} prefill {r['prefill']:7.1f} ({r['prefill_ratio']:.2f}x) "
                  f"decode {r['decode']:6.1f} ({r['decode_ratio']:.2f}x)", flush=True)
    print(f"\n{cpu_model()}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"medians of {args.rounds} rounds ({args.repeats} repeats each, 128-token prompt, {args.gen_tokens} decoded)")
    print(f"{'t':>2s} {'prefill':>8s} {'ratio':>6s} {'decode':>7s} {'ratio':>6s}   llama.cpp prefill / decode")
    for t, rs in runs.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{t:2d} {m['prefill']:8.1f} {m['prefill_ratio']:5.2f}x {m['decode']:7.1f} {m['decode_ratio']:5.2f}x   "
              f"{m['llama_prefill']:.1f} / {m['llama_decode']:.1f}")


if __name__ == "__main__":
    main()
