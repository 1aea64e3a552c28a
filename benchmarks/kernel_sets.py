"""The native engine's x86 (or Arm) kernel sets against llama.cpp, on this CPU, on SmolLM2.

Run by hand (never by tests):

    .venv/bin/python benchmarks/kernel_sets.py [--rounds 3] [--threads 1 2] [--types q4_0 q4_k_m q8_0]

For every kernel set this CPU runs (`edgeai._native.kernel_isas()`), every weight type and thread
count, `edgeai bench FILE --backend llama.cpp --backend native -t T --repeats 5 --gen-tokens 64
--json` runs in a child with `EDGEAI_ISA=SET`; llama.cpp is measured again in every run, so each
ratio is native / llama.cpp of the same run, same file, same threads. Rounds go over every
(type, threads, set) in turn, so slow drifts of a noisy machine reach every set alike; the table
gives per set the median over rounds of the prefill and decode tokens/s and of the ratios, and
names the set the engine picks by itself (no EDGEAI_ISA). The models are the bundled SmolLM2
converted with `edgeai convert --quant TYPE` (cached in ~/.cache/edgeai-bench). Figures and the
CPU model go to kernel_sets.json in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import cpu_model, model_file  # noqa: E402

BENCH = Path.home() / ".cache" / "edgeai-bench"
EDGEAI = str(Path(sys.executable).parent / "edgeai")






def bench(path: Path, isa: str | None, threads: int, repeats: int, gen: int) -> dict:
    env = dict(os.environ)
    env.pop("EDGEAI_ISA", None)
    if isa:
        env["EDGEAI_ISA"] = isa
    out = subprocess.run([EDGEAI, "bench", str(path), "--backend", "llama.cpp", "--backend", "native", "-t", str(threads),
                          "--repeats", str(repeats), "--gen-tokens", str(gen), "--json"],
                         env=env, check=True, capture_output=True, text=True).stdout
    theirs, ours = json.loads(out)["results"]
    return {"llama_prefill": theirs["prefill_tps"], "llama_decode": theirs["decode_tps"],
            "prefill": ours["prefill_tps"], "decode": ours["decode_tps"],
            "prefill_ratio": ours["prefill_tps"] / theirs["prefill_tps"], "decode_ratio": ours["decode_tps"] / theirs["decode_tps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=["q4_0", "q4_k_m", "q8_0"])
    ap.add_argument("--sets", nargs="+", default=None, help="kernel sets (default: every one this CPU runs)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=BENCH)
    args = ap.parse_args()

    from edgeai import _native

    sets = args.sets or [s for s in _native.kernel_isas() if s != "scalar"]
    auto = subprocess.run([sys.executable, "-c", "from edgeai import _native; print(_native.kernel_best())"],
                          capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items() if k != "EDGEAI_ISA"}).stdout.strip()
    files = {kind: model_file(kind) for kind in args.types}
    runs: dict[tuple[str, int, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for kind, path in files.items():
            for t in args.threads:
                for isa in sets:
                    r = bench(path, isa, t, args.repeats, args.gen_tokens)
                    runs.setdefault((kind, t, isa), []).append(r)
                    print(f"round {rnd + 1} {kind} t={t} {isa:12s} prefill {r['prefill']:7.1f} ({r['prefill_ratio']:.2f}x) "
                          f"decode {r['decode']:6.1f} ({r['decode_ratio']:.2f}x)", flush=True)
    table = []
    for (kind, t, isa), rs in runs.items():
        row = {"type": kind, "threads": t, "set": isa, "rounds": len(rs)}
        row.update({k: statistics.median(r[k] for r in rs) for k in rs[0]})
        table.append(row)
    print(f"\n{cpu_model()}; automatic choice: {auto}; medians of {args.rounds} rounds "
          f"({args.repeats} repeats each, 128-token prompt, {args.gen_tokens} decoded)")
    print(f"{'type':8s} {'t':>2s} {'set':12s} {'prefill':>8s} {'ratio':>6s} {'decode':>7s} {'ratio':>6s}   llama.cpp prefill / decode")
    for row in table:
        print(f"{row['type']:8s} {row['threads']:2d} {row['set']:12s} {row['prefill']:8.1f} {row['prefill_ratio']:5.2f}x "
              f"{row['decode']:7.1f} {row['decode_ratio']:5.2f}x   {row['llama_prefill']:.1f} / {row['llama_decode']:.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_sets.json").write_text(json.dumps({"cpu": cpu_model(), "auto": auto, "table": table}, indent=1))


if __name__ == "__main__":
    main()
