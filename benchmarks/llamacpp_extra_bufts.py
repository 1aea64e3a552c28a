"""What llama.cpp's fallback costs: its weights loaded with and without `use_extra_bufts` (the repacked and
AMX weight buffers), on SmolLM2, through the llama.cpp backend.

Run by hand (never by tests):

    .venv/bin/python benchmarks/llamacpp_extra_bufts.py [--rounds 5] [--threads 1 2] [--types q4_0 q4_k_m q8_0]

Where llama.cpp as built crashes on a CPU (AMX on some Xeons) and works with `use_extra_bufts` off,
edgeai loads every llama.cpp model so (`runtimes/llamacpp_check.py`). Each round measures both ways in
children (`edgeai.bench.measure`: 128-token prompt, 64 decoded, 5 repeats, medians), one after the
other, the order alternating between rounds; the table gives medians over rounds and the ratio
without / with. The models are those of benchmarks/kernel_sets.py (~/.cache/edgeai-bench).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from kernel_sets import cpu_model, model_file

CHILD = """
import json, sys
from edgeai.runtimes import llamacpp_check as lc
from edgeai.bench import measure
path, threads, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if not extra:  # what the check decides where only this works
    lc._result = lc.CheckResult(lc.Verdict.NO_EXTRA_BUFTS, "benchmark", lc.system_info())
r = measure(path, "llama.cpp", threads=threads, n_prompt=128, n_gen=64, repeats=5)
print(json.dumps({"prefill": r.prefill_tps, "decode": r.decode_tps}))
"""


def run(path, threads: int, extra: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(threads), "1" if extra else "0"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=["q4_0", "q4_k_m", "q8_0"])
    args = ap.parse_args()
    rows = []
    for kind in args.types:
        path = model_file(kind)
        for t in args.threads:
            got = {True: [], False: []}
            for rnd in range(args.rounds):
                for extra in ((True, False) if rnd % 2 == 0 else (False, True)):
                    got[extra].append(run(path, t, extra))
            med = {e: {k: statistics.median(r[k] for r in rs) for k in ("prefill", "decode")} for e, rs in got.items()}
            rows.append((kind, t, med))
            print(f"{kind:7s} t={t}  with: prefill {med[True]['prefill']:7.1f} decode {med[True]['decode']:6.1f}   "
                  f"without: prefill {med[False]['prefill']:7.1f} ({med[False]['prefill'] / med[True]['prefill']:.2f}x) "
                  f"decode {med[False]['decode']:6.1f} ({med[False]['decode'] / med[True]['decode']:.2f}x)", flush=True)
    print(f"{cpu_model()}; medians of {args.rounds} rounds")


if __name__ == "__main__":
    main()
