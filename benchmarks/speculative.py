"""Speculative decoding on SmolLM2 (Q8_0 and Q4_0 targets, 1 and 2 threads), side by side in one run:
plain native decode, native with each drafter, and llama-cpp-python's own prompt-lookup decoding
(`Llama(draft_model=LlamaPromptLookupDecoding(...))`) on the same file, prompt tokens and thread count.

Run by hand on a quiet machine (never by tests):

    .venv/bin/python benchmarks/speculative.py [--rounds 3] [--threads 1 2] [--types q8_0 q4_0]
        [--draft PATH | --make-draft N] [--drafters lookup self] [--max-tokens 128] [--out DIR]

Drafters: prompt lookup, self-speculation (layer skipping), and a draft model: `--draft PATH`, or
`--make-draft N` to make one from SmolLM2 itself with edgeai (`edgeai convert --draft-of TARGET
--draft-layers N`: N blocks kept, 0 for the default, Q4_0, calibrated on standard-library docstrings;
cached beside the targets).

Tasks (written for this benchmark): input-grounded ones, where the answer copies from the prompt
(rewrite a passage with its spelling fixed, edit given code, extract facts from a given text), and an
open chat question; each greedy and at temperature 0.7 (seeded, top-k 40, top-p 0.95, min-p 0.05).
The prompt is the chat template's rendering of the task (the same token ids for both engines).
Decode tokens/s is (tokens - 1) / (time from the first token to the last), prefill apart; each
figure is the median over rounds, every configuration running once per round in turn. Reported per
file, thread count, task and temperature: tokens/s of each configuration, its ratio to plain native
decode and to llama-cpp-python's prompt lookup, and each drafter's acceptance rate and mean accepted
length. The files are converted with `edgeai convert --quant TYPE` (cached in ~/.cache/edgeai-bench).
Figures and the CPU model go to speculative.json in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_common import cpu_model, model_file  # noqa: E402

BENCH = Path.home() / ".cache" / "edgeai-bench"
EDGEAI = str(Path(sys.executable).parent / "edgeai")

PASSAGE = ("The comittee met on tuesday to dicuss the new libary budget. After a long debate, the members agred "
           "that the childrens section needed new books and that the reading room should stay open untill nine "
           "in the evening. The treasurer warned that the heating costs had risen sharply this winter, and "
           "sugested that volunteers could help with the evening shifts.")
CODE = '''def average(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)


def report(scores):
    for name, value in scores.items():
        print(name, average(value))
'''
ARTICLE = ("Maria Lopez, 34, joined Northwind Labs in Lisbon in March 2021 as a data engineer. Before that she "
           "worked for six years at Atlas Shipping in Porto. Her manager, Tom Becker, says her pipeline cut the "
           "nightly processing time from five hours to forty minutes. She holds a degree in physics from the "
           "University of Coimbra and speaks Portuguese, Spanish and English.")

TASKS = {
    "rewrite": (True, f"Rewrite this passage with the spelling mistakes fixed, changing nothing else:\n\n{PASSAGE}"),
    "code-edit": (True, "Rename the function `average` to `mean` everywhere in this code and return the whole "
                        f"code:\n\n```python\n{CODE}```"),
    "extract": (True, "From the text below, list the person's name, age, employer, city, start date, previous "
                      f"employer, manager and languages, one per line as 'field: value'.\n\n{ARTICLE}"),
    "open-chat": (False, "What are three good habits for staying focused while studying? Explain each briefly."),
}
TEMPERATURES = (0.0, 0.7)






def draft_file(keep: int, target: Path) -> Path:
    """A draft made by edgeai from SmolLM2's checkpoint for `target` (`edgeai.convert(draft_of=)`: the
    blocks that change the hidden state least dropped, `keep` kept (0: the library's default), Q4_0),
    calibrated on standard-library docstrings."""
    import argparse as a, collections, json as j, os, re, textwrap

    import edgeai

    path = BENCH / f"smollm2-draft-keep{keep or 'default'}-q4_0.gguf"
    if not path.exists():
        BENCH.mkdir(parents=True, exist_ok=True)
        calib = BENCH / "draft-calib.txt"
        calib.write_text("\n\n".join(m.__doc__ or "" for m in (a, collections, j, os, re, textwrap)))
        edgeai.convert(None, path, draft_of=target, draft_layers=keep or None, calib=calib, force=True)
    return path


def sampling(temperature: float) -> dict:
    return dict(temperature=temperature, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, seed=7)


def run_edgeai(model, prompt: list[int], temperature: float, max_tokens: int) -> tuple[float, int]:
    """(decode tokens/s, tokens) of one answer through `Model.stream`."""
    model.reset()
    n, t1 = 0, None
    for chunk in model.stream(prompt, max_tokens=max_tokens, **sampling(temperature)):
        if chunk.token is None:
            break
        n += 1
        if n == 1:
            t1 = time.perf_counter()
    return ((n - 1) / (time.perf_counter() - t1) if n > 1 else 0.0), n


def run_llama(llm, prompt: list[int], temperature: float, max_tokens: int) -> tuple[float, int]:
    """(decode tokens/s, tokens) of one answer through `Llama.generate` (its draft_model, if any,
    speculates), stopping at end-of-generation tokens as edgeai does."""
    s = sampling(temperature)
    llm.reset()
    eog = {llm.token_eos()}
    n, t1 = 0, None
    for tok in llm.generate(prompt, top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"], temp=temperature,
                            repeat_penalty=1.0, reset=True):
        if tok in eog:
            break
        n += 1
        if n == 1:
            t1 = time.perf_counter()
        if n >= max_tokens:
            break
    return ((n - 1) / (time.perf_counter() - t1) if n > 1 else 0.0), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0"])
    ap.add_argument("--draft", type=Path, default=None, help="a draft model GGUF with SmolLM2's vocabulary")
    ap.add_argument("--make-draft", type=int, default=None, metavar="N",
                    help="make the draft model: SmolLM2 with N of its 30 blocks kept (0: edgeai's default), Q4_0")
    ap.add_argument("--drafters", nargs="+", default=["lookup", "self"], help="lookup and/or self")
    ap.add_argument("--fixed-length", action="store_true",
                    help="draft --draft-tokens every step (no adaptation): each drafter's raw acceptance")
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()

    import edgeai
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = args.draft or (draft_file(args.make_draft, model_file(args.types[0])) if args.make_draft is not None
                           else None)
    drafters = list(args.drafters) + ([str(draft)] if draft else [])
    rows = []
    for kind in args.types:
        path = model_file(kind)
        for threads in args.threads:
            engines = {"native": edgeai.load(path, backend="native", threads=threads, n_ctx=1024)}
            for d in drafters:
                engines[f"native+{Path(d).name if d not in ('lookup', 'self') else d}"] = edgeai.load(
                    path, backend="native", threads=threads, n_ctx=1024, speculative=d, draft_tokens=args.draft_tokens)
            for m in engines.values():
                if m._speculator is not None:
                    m._speculator.adaptive = not args.fixed_length
            llamas = {"llama.cpp": Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                                         verbose=False, logits_all=False),
                      "llama.cpp+lookup": Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                                                verbose=False, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))}
            base = engines["native"]
            for task in args.tasks:
                grounded, text = TASKS[task]
                prompt = base.chat_tokens([{"role": "user", "content": text}])
                for temperature in TEMPERATURES:
                    speeds: dict[str, list[float]] = {}
                    counts: dict[str, int] = {}
                    accept: dict[str, dict] = {}
                    for name, m in engines.items():  # the counters of this task only
                        if m._speculator is not None:
                            from edgeai.speculative import SpeculativeStats

                            m._speculator.stats = SpeculativeStats(m._speculator.stats.drafter, args.draft_tokens)
                    for _ in range(args.rounds):
                        for name, m in engines.items():
                            tps, n = run_edgeai(m, prompt, temperature, args.max_tokens)
                            speeds.setdefault(name, []).append(tps)
                            counts[name] = n
                        for name, llm in llamas.items():
                            tps, n = run_llama(llm, prompt, temperature, args.max_tokens)
                            speeds.setdefault(name, []).append(tps)
                            counts[name] = n
                    for name, m in engines.items():
                        if m._speculator is not None:
                            accept[name] = m._speculator.stats.as_dict()
                    med = {k: statistics.median(v) for k, v in speeds.items()}
                    row = {"type": kind, "threads": threads, "task": task, "grounded": grounded,
                           "temperature": temperature, "tokens_per_s": med, "tokens": counts,
                           "vs_native": {k: v / med["native"] for k, v in med.items() if med["native"]},
                           "vs_llama_lookup": {k: v / med["llama.cpp+lookup"] for k, v in med.items()
                                               if med["llama.cpp+lookup"]},
                           "acceptance": {k: {"rate": a["acceptance_rate"], "mean_accepted": a["mean_accepted_length"]}
                                          for k, a in accept.items()}}
                    rows.append(row)
                    spec = "  ".join(f"{k} {v:.1f} ({row['vs_native'].get(k, 0):.2f}x)" for k, v in med.items())
                    acc = "  ".join(f"{k} {100 * a['rate']:.0f}%/{a['mean_accepted']:.2f}"
                                    for k, a in row["acceptance"].items())
                    print(f"{kind} t{threads} {task:9s} T={temperature}: {spec} | accepted {acc}", flush=True)
            for m in engines.values():
                m.close()
            del llamas
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculative.json").write_text(json.dumps({"cpu": cpu_model(), "rounds": args.rounds,
                                                           "max_tokens": args.max_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
