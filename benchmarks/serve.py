"""`edgeai serve` under load, side by side with llama.cpp's `llama-server` and llama-cpp-python's server.

On 127.0.0.1 only, requests bounded in count and time, every server a child process killed on exit.
Run by hand (never by tests):

    bash benchmarks/build_llama_server.sh        # once: llama.cpp's own llama-server, see that script
    .venv/bin/pip install fastapi==0.165.0 pydantic-settings==2.16.3 sse-starlette==3.7.1 \\
        starlette-context==0.3.6 PyYAML     # once: llama-cpp-python's [server] extras
    .venv/bin/python benchmarks/serve.py [--model FILE] [--threads 2] [--rounds 3] [--tokens 64] [--parallel 8]
        [--llama-server PATH] [--servers edgeai,llama-server,llama-cpp-python] [--out build/bench]

Measured, medians over rounds, greedy, the same prompts, file and threads for every server, each
through the official `openai` client:
- single stream: decode tokens/s of one streamed chat through HTTP; for edgeai also against the same
  chats through the in-process API (`Model.chat(stream=True)`), same engine and threads: the cost of
  the HTTP layer on a machine the server, the client and the engine share;
- concurrency: total tokens/s with 1, 2, 4 and 8 concurrent streams (each `--tokens` long).
  edgeai: one server decoding up to `--parallel` of them in one batched step (1: one at a time, as
  before batching). llama-server: a server per stream count with as many parallel slots as streams
  (`-np N`, `-c N * 2048`: each slot 2048 positions as edgeai's, continuous batching).
  llama-cpp-python's server decodes one request at a time (the others wait; started with
  `--interrupt_requests False`, else a new request cuts the one streaming);
- prefix reuse: time to first token of a second chat turn over a ~1,000-token history against the
  first turn's (each server keeps the conversation's KV cache between requests).
Each server answers one unmeasured one-token chat after it starts (weights paged in, buffers
allocated). Servers whose binary or package is missing are skipped, saying why. Figures, the CPU model and the
load average go to serve-parallelN.json in --out; each server's log to serve-logs/ beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import cpu_model  # noqa: E402

EDGEAI = str(Path(sys.executable).parent / "edgeai")
LLAMA_SERVER = Path.home() / ".cache/edgeai-bench/llama-server-build/build/bin/llama-server"
LCP_EXTRAS = "fastapi==0.165.0 pydantic-settings==2.16.3 sse-starlette==3.7.1 starlette-context==0.3.6 PyYAML"
SERVERS = ("edgeai", "llama-server", "llama-cpp-python")
STREAMS = (1, 2, 4, 8)
N_CTX = 2048             # per sequence slot, every server
REQUEST_SECONDS = 120    # wall-clock bound of one request
START_SECONDS = 120      # bound of a server's start
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe a walk through a forest in autumn.", "Tell me about the history of bread.",
           "Write a letter to a friend about a trip to the sea.", "Explain why the sky is blue.",
           "Describe your ideal weekend.", "Write a poem about the moon."]




def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def child(cmd: list[str], log: Path, url: str | None = None, probe: str = "/health"):
    """Runs a server in its own process group, logging to `log`; yields its base URL once it answers
    GET `probe` with 200 (`url` None: at the address it prints, as edgeai does), and kills the group on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if url is None else logf, stderr=logf,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + START_SECONDS
            while url is None and time.monotonic() < deadline and proc.poll() is None:
                line = proc.stdout.readline()
                logf.write(line)
                if m := re.search(r"(http://127\.0\.0\.1:\d+)", line):
                    url = m.group(1)
                    # keep draining its stdout to the log, or a full pipe would block the server
                    threading.Thread(target=lambda: [logf.write(x) for x in proc.stdout], daemon=True).start()
                    break
            while url is not None and time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(url + probe, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:   # refused while starting; 503 while llama-server loads the model
                    pass
                time.sleep(0.2)
            else:
                raise RuntimeError(f"{cmd[0]} did not start within {START_SECONDS}s (exit code "
                                   f"{proc.poll()}); see {log}")
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def edgeai_server(model: Path, threads: int, parallel: int, log: Path):
    return child([EDGEAI, "serve", str(model), "--host", "127.0.0.1", "--port", "0", "--backend", "native",
                  "--threads", str(threads), "--n-ctx", str(N_CTX), "--max-queue", "16",
                  "--parallel", str(parallel)], log)


def llama_server(binary: Path, model: Path, threads: int, slots: int, log: Path):
    port = free_port()
    return child([str(binary), "--host", "127.0.0.1", "--port", str(port), "-m", str(model),
                  "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * N_CTX),
                  "--cont-batching", "--no-webui", "-ngl", "0"], log,
                 url=f"http://127.0.0.1:{port}")


def lcp_server(model: Path, threads: int, log: Path):
    port = free_port()
    return child([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
                  "--n_threads_batch", str(threads), "--n_ctx", str(N_CTX), "--interrupt_requests", "False",
                  "--host", "127.0.0.1", "--port", str(port)], log, url=f"http://127.0.0.1:{port}",
                 probe="/v1/models")  # it has no /health


def stream_http(client, name: str, messages: list[dict], tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds from the first token to the last, time to first token) of one streamed chat."""
    t0, stamps = time.perf_counter(), []
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=tokens, temperature=0,
                                            stream=True, timeout=REQUEST_SECONDS)
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if time.perf_counter() - t0 > REQUEST_SECONDS:
                raise TimeoutError(f"a streamed chat took over {REQUEST_SECONDS}s")
    return len(stamps), (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0, (stamps[0] - t0) if stamps else 0.0


def stream_local(model, messages: list[dict], tokens: int) -> tuple[int, float]:
    stamps = [time.perf_counter() for c in model.chat(messages, max_tokens=tokens, temperature=0, stream=True) if c.text]
    return len(stamps), (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def tps(results) -> float:
    n = sum(r[0] - 1 for r in results if r[0] > 1)
    s = sum(r[1] for r in results if r[0] > 1)
    return n / s if s else 0.0


def client_for(url: str):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=REQUEST_SECONDS)
    name = client.models.list().data[0].id
    # one unmeasured token first, the same for every server: the weights paged in, buffers allocated
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0)
    return client, name


def single(client, name: str, chats, tokens: int) -> float:
    return tps([stream_http(client, name, c, tokens)[:2] for c in chats[:4]])


def total(client, name: str, chats, tokens: int, streams: int) -> float:
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(streams)
    try:
        res = list(pool.map(lambda c: stream_http(client, name, c, tokens), chats[:streams]))
    finally:   # on an error or a signal, do not wait for the other streams: the server is killed next
        pool.shutdown(wait=False, cancel_futures=True)
    return sum(x[0] for x in res) / (time.perf_counter() - t0)


def second_turn(client, name: str) -> dict:
    history = [{"role": "user", "content": "Here are my notes:\n" + " ".join(PROMPTS) * 12 +
                "\nSummarise them in one line."}]
    _, _, ttft1 = stream_http(client, name, history, 16)
    first = client.chat.completions.create(model=name, messages=history, max_tokens=16, temperature=0)
    turn2 = history + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "Thanks. And in two words?"}]
    _, _, ttft2 = stream_http(client, name, turn2, 8)
    return {"ttft_first": ttft1, "ttft_second": ttft2, "history_tokens": first.usage.prompt_tokens}


def run_edgeai(args, model_path: Path, chats, logs: Path) -> dict:
    import edgeai

    with edgeai.load(model_path, backend="native", threads=args.threads, n_ctx=N_CTX) as m:
        local = [stream_local(m, c, args.tokens) for c in chats[:4]]
    with edgeai_server(model_path, args.threads, args.parallel, logs / "edgeai.log") as url:
        client, name = client_for(url)
        out = {"local_tps": tps(local), "http_tps": single(client, name, chats, args.tokens),
               "total_tps": {n: total(client, name, chats, args.tokens, n) for n in STREAMS},
               "slots": {n: args.parallel for n in STREAMS}}
        out.update(second_turn(client, name))
    return out


def run_llama_server(args, model_path: Path, chats, logs: Path) -> dict:
    out = {"total_tps": {}, "slots": {}}
    for n in STREAMS:
        with llama_server(args.llama_server, model_path, args.threads, n, logs / f"llama-server-np{n}.log") as url:
            client, name = client_for(url)
            if n == 1:
                out["http_tps"] = single(client, name, chats, args.tokens)
                out.update(second_turn(client, name))
            out["total_tps"][n] = total(client, name, chats, args.tokens, n)
            out["slots"][n] = n
    return out


def run_lcp(args, model_path: Path, chats, logs: Path) -> dict:
    with lcp_server(model_path, args.threads, logs / "llama-cpp-python.log") as url:
        client, name = client_for(url)
        out = {"http_tps": single(client, name, chats, args.tokens),
               "total_tps": {n: total(client, name, chats, args.tokens, n) for n in STREAMS},
               "slots": {n: 1 for n in STREAMS}}
        out.update(second_turn(client, name))
    return out


def skip_reason(server: str, args) -> str | None:
    if server == "llama-server" and not (args.llama_server and Path(args.llama_server).is_file()):
        return (f"no llama-server binary at {args.llama_server or LLAMA_SERVER}: build it with "
                "`bash benchmarks/build_llama_server.sh` or pass --llama-server PATH")
    if server == "llama-cpp-python":
        missing = [m for m in ("llama_cpp", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings",
                               "uvicorn", "yaml") if importlib.util.find_spec(m) is None]
        if missing:
            return (f"llama-cpp-python's server needs its [server] extras, missing: {', '.join(missing)}; "
                    f"install with `.venv/bin/pip install {LCP_EXTRAS}`")
    return None


def summarise(rounds: list[dict]) -> dict:
    med = statistics.median
    out = {"single_stream": {"http_tps": med([x["http_tps"] for x in rounds])},
           "total_tps_by_streams": {n: med([x["total_tps"][n] for x in rounds]) for n in STREAMS},
           "slots_by_streams": rounds[0]["slots"],
           "second_turn": {"history_tokens": rounds[-1]["history_tokens"],
                           "ttft_first_s": med([x["ttft_first"] for x in rounds]),
                           "ttft_second_s": med([x["ttft_second"] for x in rounds]),
                           "ratio": med([x["ttft_first"] / x["ttft_second"] for x in rounds if x["ttft_second"]] or [0.0])}}
    if "local_tps" in rounds[0]:
        out["single_stream"]["in_process_tps"] = med([x["local_tps"] for x in rounds])
        out["single_stream"]["ratio"] = med([x["http_tps"] / x["local_tps"] for x in rounds if x["local_tps"]] or [0.0])
    return out


def ratios(e: dict, l: dict) -> dict:
    """edgeai / llama-server: tokens/s ratios, and time-to-first-token as speed (llama-server's seconds
    over edgeai's), so above 1 means edgeai is faster everywhere."""
    div = lambda a, b: a / b if b else None  # noqa: E731
    return {"single_stream_http_tps": div(e["single_stream"]["http_tps"], l["single_stream"]["http_tps"]),
            "total_tps_by_streams": {n: div(e["total_tps_by_streams"][n], l["total_tps_by_streams"][n]) for n in STREAMS},
            "ttft_second_turn_speed": div(l["second_turn"]["ttft_second_s"], e["second_turn"]["ttft_second_s"])}


def table(servers: dict, rat: dict | None) -> str:
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"{'server':<17} {'slots':>5} {'streams':>7} {'total tok/s':>11} {'edgeai/llama-server':>19}"]
    for s, res in servers.items():
        for n in STREAMS:
            r = rat["total_tps_by_streams"][n] if rat and s == "edgeai" else None
            lines.append(f"{s:<17} {res['slots_by_streams'][n]:>5} {n:>7} {fmt(res['total_tps_by_streams'][n]):>11} "
                         f"{fmt(r, 2):>19}")
    lines += ["", f"{'server':<17} {'1-stream tok/s':>14} {'TTFT turn 1 s':>13} {'TTFT turn 2 s':>13} {'turn1/turn2':>11}"]
    for s, res in servers.items():
        t = res["second_turn"]
        lines.append(f"{s:<17} {fmt(res['single_stream']['http_tps']):>14} {fmt(t['ttft_first_s'], 3):>13} "
                     f"{fmt(t['ttft_second_s'], 3):>13} {fmt(t['ratio']):>11}")
    if rat:
        lines.append(f"edgeai/llama-server: 1-stream tok/s {fmt(rat['single_stream_http_tps'], 2)}, "
                     f"second-turn TTFT speed {fmt(rat['ttft_second_turn_speed'], 2)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=8, help="edgeai's sequence slots (1: no batching)")
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER if LLAMA_SERVER.is_file() else None,
                    help=f"llama.cpp's llama-server binary (default: {LLAMA_SERVER} if built)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of " + ", ".join(SERVERS))
    ap.add_argument("--out", type=Path, default=Path("build/bench"))
    args = ap.parse_args()
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := set(wanted) - set(SERVERS):
        ap.error(f"unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    # SIGTERM (a killed benchmark) unwinds like Ctrl-C, so every child server is killed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from edgeai.paths import default_model_path

    model_path = (args.model or default_model_path()).resolve()
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    logs = args.out / "serve-logs"
    skipped = {s: r for s in wanted if (r := skip_reason(s, args))}
    for s, r in skipped.items():
        print(f"skipping {s}: {r}", flush=True)
    runners = {"edgeai": run_edgeai, "llama-server": run_llama_server, "llama-cpp-python": run_lcp}
    per_server: dict[str, list[dict]] = {s: [] for s in wanted if s not in skipped}
    for r in range(args.rounds):
        for s in per_server:
            per_server[s].append(runners[s](args, model_path, chats, logs))
            print(f"round {r + 1} {s}: {per_server[s][-1]}", flush=True)

    servers = {s: summarise(rs) for s, rs in per_server.items()}
    rat = ratios(servers["edgeai"], servers["llama-server"]) if {"edgeai", "llama-server"} <= servers.keys() else None
    result = {"cpu": cpu_model(), "threads": args.threads, "model": model_path.name, "rounds": args.rounds,
              "tokens": args.tokens, "parallel": args.parallel, "n_ctx_per_slot": N_CTX,
              "load_average": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
              "llama_server": str(args.llama_server) if "llama-server" in servers else None,
              **servers.get("edgeai", {}),   # edgeai's figures at the top level, as before the peers
              "servers": servers, "edgeai_over_llama_server": rat, "skipped": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serve-parallel{args.parallel}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(table(servers, rat))


if __name__ == "__main__":
    main()
