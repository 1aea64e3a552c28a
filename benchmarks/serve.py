"""`edgeai serve` under load, on 127.0.0.1 only, requests bounded in count and time.

Run by hand (never by tests):

    .venv/bin/python benchmarks/serve.py [--model FILE] [--threads 2] [--rounds 3] [--tokens 64] [--parallel 8]

Measured, medians over rounds, greedy, the same prompts everywhere:
- single stream: decode tokens/s of one streamed chat through HTTP (the official `openai` client)
  against the same chats through the in-process API (`Model.chat(stream=True)`), same engine and
  threads: the cost of the HTTP layer on a machine the server, the client and the engine share;
- concurrency: total tokens/s with 1, 2, 4 and 8 concurrent streams (each `--tokens` long), the
  server decoding up to `--parallel` of them in one batched step (1: one at a time, as before
  batching);
- prefix reuse: time to first token of a second chat turn over a ~1,000-token history against the
  first turn's (the server keeps the conversation's KV cache between requests).
The server runs as `edgeai serve` in a child process. Figures, the CPU model and the load average
go to serve-parallelN.json in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EDGEAI = str(Path(sys.executable).parent / "edgeai")
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe a walk through a forest in autumn.", "Tell me about the history of bread.",
           "Write a letter to a friend about a trip to the sea.", "Explain why the sky is blue.",
           "Describe your ideal weekend.", "Write a poem about the moon."]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def start_server(model: Path, threads: int, parallel: int = 1) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([EDGEAI, "serve", str(model), "--port", "0", "--backend", "native", "--threads", str(threads),
                             "--n-ctx", "2048", "--max-queue", "16", "--parallel", str(parallel)],
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := re.search(r"(http://127\.0\.0\.1:\d+)", line):
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("edgeai serve did not start")


def stream_http(client, name: str, messages: list[dict], tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds from the first token to the last, time to first token) of one streamed chat."""
    t0, stamps = time.perf_counter(), []
    for chunk in client.chat.completions.create(model=name, messages=messages, max_tokens=tokens, temperature=0,
                                                stream=True, timeout=120):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return len(stamps), (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0, (stamps[0] - t0) if stamps else 0.0


def stream_local(model, messages: list[dict], tokens: int) -> tuple[int, float]:
    stamps = [time.perf_counter() for c in model.chat(messages, max_tokens=tokens, temperature=0, stream=True) if c.text]
    return len(stamps), (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def tps(results) -> float:
    n = sum(r[0] - 1 for r in results if r[0] > 1)
    s = sum(r[1] for r in results if r[0] > 1)
    return n / s if s else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=8, help="the server's sequence slots (1: no batching)")
    ap.add_argument("--out", type=Path, default=Path("build/bench"))
    args = ap.parse_args()

    import openai

    import edgeai
    from edgeai.paths import default_model_path

    model_path = args.model or default_model_path()
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    rounds = []
    for r in range(args.rounds):
        with edgeai.load(model_path, backend="native", threads=args.threads, n_ctx=2048) as m:
            local = [stream_local(m, c, args.tokens) for c in chats[:4]]
        proc, url = start_server(model_path, args.threads, args.parallel)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            name = client.models.list().data[0].id
            single = [stream_http(client, name, c, args.tokens)[:2] for c in chats[:4]]
            total = {}
            for streams in (1, 2, 4, 8):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(streams) as pool:
                    res = list(pool.map(lambda c: stream_http(client, name, c, args.tokens), chats[:streams]))
                total[streams] = sum(x[0] for x in res) / (time.perf_counter() - t0)
            history = [{"role": "user", "content": "Here are my notes:\n" + " ".join(PROMPTS) * 12 +
                        "\nSummarise them in one line."}]
            _, _, ttft1 = stream_http(client, name, history, 16)
            first = client.chat.completions.create(model=name, messages=history, max_tokens=16, temperature=0)
            turn2 = history + [{"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "Thanks. And in two words?"}]
            _, _, ttft2 = stream_http(client, name, turn2, 8)
            prompt_tokens = first.usage.prompt_tokens
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        rounds.append({"local_tps": tps(local), "http_tps": tps(single), "total_tps": total,
                       "ttft_first": ttft1, "ttft_second": ttft2, "history_tokens": prompt_tokens})
        print(f"round {r + 1}: {rounds[-1]}", flush=True)

    med = statistics.median
    result = {"cpu": cpu_model(), "threads": args.threads, "model": model_path.name, "rounds": args.rounds,
              "parallel": args.parallel, "load_average": Path("/proc/loadavg").read_text().split()[:3]
              if Path("/proc/loadavg").exists() else None,
              "single_stream": {"http_tps": med([x["http_tps"] for x in rounds]), "in_process_tps": med([x["local_tps"] for x in rounds]),
                                "ratio": med([x["http_tps"] / x["local_tps"] for x in rounds])},
              "total_tps_by_streams": {k: med([x["total_tps"][k] for x in rounds]) for k in (1, 2, 4, 8)},
              "second_turn": {"history_tokens": rounds[-1]["history_tokens"], "ttft_first_s": med([x["ttft_first"] for x in rounds]),
                              "ttft_second_s": med([x["ttft_second"] for x in rounds]),
                              "ratio": med([x["ttft_first"] / x["ttft_second"] for x in rounds])}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serve-parallel{args.parallel}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
