"""edgeai's int4 ONNX export vs onnxruntime-genai's model builder, on SmolLM2-135M, in onnxruntime.

Run by hand (never by tests); needs `pip install onnxruntime-genai onnx-ir` in the venv (the builder):

    .venv/bin/python benchmarks/onnx_vs_genai.py [--method rtn|imatrix|awq|gptq] [--runs 5] [--threads 1 2]

Both folders are made from the same F32 Hugging Face checkpoint (`tests/helpers.py`
`smollm2_hf_checkpoint`, cached in ~/.cache/edgeai-bench/smollm2-hf-f32):

* edgeai:  `edgeai convert CKPT -o ours --format onnx --quant int4 --block-size 32 --method M [--calib calib.txt]`
* theirs:  `python -m onnxruntime_genai.models.builder -i CKPT -o theirs -p int4 -e cpu` (its defaults:
           block 32, symmetric RTN, accuracy_level 4, tied embedding shared with the int4 lm_head)

and measured the same way: size (model.onnx + external data), KL divergence / perplexity / top-1
against an F16 GGUF reference (`edgeai.evaluate`: llama.cpp runs the reference, onnxruntime
runs both ONNX folders), and prefill / decode tokens per second through the same loop
(`edgeai.runtimes.onnxrt.OnnxBackend`: the KV cache in place in shared past/present buffers, as
both folders' genai_config.json allow; one graph run per step) at each thread count; the medians of
--runs runs, the two models alternating run by run in ABBA order. Each method's figures go to
report-METHOD.json in the work folder (the genai folder is shared by every method).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path.home() / ".cache" / "edgeai-bench"
HERE = Path(__file__).resolve().parent


def folder_size(folder: Path) -> int:
    """Bytes of the graph and its weights (model.onnx + *.data), not the tokenizer files."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith((".onnx", ".data")))


def texts(work: Path) -> tuple[Path, Path]:
    """(calibration text, evaluation text): the quantization benchmark's, made by its functions if absent."""
    sys.path.insert(0, str(HERE))
    from quant_vs_llamacpp import site_packages_licenses, stdlib_docstrings, write_text

    shared = BENCH / "quant-vs-llamacpp"
    calib = shared / "calib.txt" if (shared / "calib.txt").is_file() else write_text(work / "calib.txt", None, stdlib_docstrings)
    text = shared / "eval.txt" if (shared / "eval.txt").is_file() else write_text(work / "eval.txt", None, site_packages_licenses)
    return calib, text


def checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import smollm2_hf_checkpoint

    return smollm2_hf_checkpoint(path)


def run(argv: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(argv, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def speed(folders: dict[str, Path], threads: int, runs: int, prompt: list[int], n_decode: int) -> dict[str, dict]:
    """Median prefill and decode tokens/s of each folder at `threads`, runs alternating between folders."""
    from edgeai.runtimes.base import GREEDY
    from edgeai.bench import timed_generation
    from edgeai.runtimes.onnxrt import OnnxBackend

    backends = {k: OnnxBackend(p, threads=threads) for k, p in folders.items()}
    samples = {k: {"prefill": [], "decode": []} for k in folders}
    for b in backends.values():  # warm-up: first runs allocate and pre-pack
        b.set_sampling(GREEDY)
        b.step(prompt)
        b.step([1])
    pairs = list(backends.items())
    for i in range(runs):
        # ABBA order: on a shared 2-core machine a run's place in a fixed rotation shifted its speed
        # by up to ~5 % (the same folder loaded twice), which a fixed order credits to one model
        for key, b in pairs if i % 2 == 0 else pairs[::-1]:
            t_prefill, t_decode = timed_generation(b, prompt, n_decode)
            samples[key]["prefill"].append(len(prompt) / t_prefill)
            samples[key]["decode"].append(n_decode / t_decode)
    for b in backends.values():
        b.close()
    out = {k: {m: statistics.median(v) for m, v in s.items()} | {"runs": runs} for k, s in samples.items()}
    # the ratio of each run's pair (the two folders measured back to back): on a noisy machine its
    # median and quartiles say more than the ratio of the two medians
    first, second = list(folders)[:2]  # (the benchmark passes two; experiments may add more)
    for m in ("prefill", "decode"):
        ratios = sorted(a / b for a, b in zip(samples[first][m], samples[second][m]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else ratios * 3
        out[first][f"{m}_ratio_paired"] = {"median": statistics.median(ratios), "q1": q[0], "q3": q[-1]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=BENCH / "smollm2-hf-f32")
    p.add_argument("--work", type=Path, default=BENCH / "onnx-vs-genai")
    p.add_argument("--method", default="gptq", choices=["rtn", "imatrix", "awq", "gptq"])
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--rebuild", action="store_true", help="Export both folders again even if they exist.")
    p.add_argument("--speed-only", action="store_true",
                   help="Measure speed only; keep the quality figures of the last report-METHOD.json (same folders).")
    args = p.parse_args(argv)

    from edgeai.evaluate import evaluate

    work = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args.checkpoint)
    calib, text = texts(work)
    venv_bin = Path(sys.executable).parent
    ref = work / "ref-f16.gguf"
    if not ref.is_file():
        run([str(venv_bin / "edgeai"), "convert", str(ckpt), "-o", str(ref), "--outtype", "f16", "-q"], work / "logs" / "ref.log")
    ours, theirs = work / f"edgeai-int4-{args.method}-b{args.block_size}", work / f"genai-int4-b{args.block_size}"
    export_seconds = {}
    if args.rebuild or not ours.is_dir():
        cmd = [str(venv_bin / "edgeai"), "convert", str(ckpt), "-o", str(ours), "--format", "onnx", "--quant", "int4",
               "--block-size", str(args.block_size), "--method", args.method, "--force", "-q"]
        if args.method != "rtn":
            cmd += ["--calib", str(calib)]
        export_seconds["edgeai"] = run(cmd, work / "logs" / "ours.log")
    if args.rebuild or not theirs.is_dir():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(theirs), "-p", "int4",
               "-e", "cpu", "-c", str(work / "genai-cache"), "--extra_options", f"block_size={args.block_size}"]
        export_seconds["genai"] = run(cmd, work / "logs" / "genai.log")
    folders = {"edgeai": ours, "genai": theirs}
    report_file = work / f"report-{args.method}.json"

    report: dict = {"checkpoint": str(ckpt), "reference": str(ref), "text": str(text), "calib": str(calib),
                    "method": args.method, "block_size": args.block_size, "export_seconds": export_seconds, "models": {}}
    if args.speed_only:
        report["models"] = json.loads(report_file.read_text())["models"]
    for key, folder in folders.items():
        if args.speed_only:
            report["models"][key]["size_bytes"] = folder_size(folder)
            continue
        r = evaluate(folder, ref, text, n_ctx=args.ctx, n_chunks=args.chunks, threads=max(args.threads))
        report["models"][key] = {"folder": str(folder), "size_bytes": folder_size(folder), "ppl": r.ppl,
                                 "ref_ppl": r.ref_ppl, "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "top1": r.top1,
                                 "scored_tokens": r.n_tokens}
        print(f"{key}: KLD {r.kld_mean:.5f}, PPL {r.ppl:.3f} (ref {r.ref_ppl:.3f})", flush=True)

    from edgeai.runtimes.onnxrt import OnnxBackend

    probe = OnnxBackend(ours, threads=1)
    prompt = probe.tokenize(text.read_text(encoding="utf-8"))[: args.prompt_tokens]
    probe.close()
    for t in args.threads:
        for key, s in speed(folders, t, args.runs, prompt, args.decode_tokens).items():
            report["models"][key][f"threads_{t}"] = s
    report_file.write_text(json.dumps(report, indent=2))

    e, g = report["models"]["edgeai"], report["models"]["genai"]
    print(f"\nSmolLM2-135M int4 (block {args.block_size}), ours --method {args.method}; KLD vs F16 on {args.chunks} "
          f"chunks of {args.ctx}; speed: {len(prompt)}-token prefill, {args.decode_tokens} decode steps, median of "
          f"{args.runs} runs")
    print(f"{'':26}{'edgeai':>12}{'genai builder':>15}{'ratio':>8}")
    rows = [("size (MiB)", e["size_bytes"] / 2**20, g["size_bytes"] / 2**20, "{:.2f}"),
            ("KLD mean", e["kld_mean"], g["kld_mean"], "{:.5f}"), ("KLD p99", e["kld_p99"], g["kld_p99"], "{:.4f}"),
            ("PPL", e["ppl"], g["ppl"], "{:.3f}"), ("top-1 agreement", e["top1"], g["top1"], "{:.4f}")]
    for t in args.threads:
        rows += [(f"prefill tok/s, {t} thread(s)", e[f"threads_{t}"]["prefill"], g[f"threads_{t}"]["prefill"], "{:.1f}"),
                 (f"decode tok/s, {t} thread(s)", e[f"threads_{t}"]["decode"], g[f"threads_{t}"]["decode"], "{:.1f}")]
    for label, a, b, f in rows:
        print(f"{label:26}{f.format(a):>12}{f.format(b):>15}{a / b:>8.3f}")
    for t in args.threads:
        for m in ("prefill", "decode"):
            r = e[f"threads_{t}"][f"{m}_ratio_paired"]
            print(f"{m} ratio of back-to-back pairs, {t} thread(s): median {r['median']:.3f} "
                  f"(quartiles {r['q1']:.3f}-{r['q3']:.3f})")
    print(f"reference PPL (F16, llama.cpp): {e['ref_ppl']:.3f}; report: {report_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
