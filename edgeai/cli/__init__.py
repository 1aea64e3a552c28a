"""The `edgeai` command. Each command calls the public library function of its name (`edgeai.convert`,
`edgeai.inspect.inspect`, `edgeai.evaluate.eval`, `edgeai.run`, `edgeai.bench.bench`,
`edgeai.devices.report.devices`, `edgeai.fit.fit`; `chat` is the REPL, `edgeai.cli.repl.chat`) and prints
what it returns; each flag is named as that function's keyword argument (`--n-ctx` is `n_ctx`),
older spellings kept as hidden aliases (`ALIASES`). Heavy modules are imported inside the commands
so that `edgeai --help` stays fast."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from edgeai.errors import EdgeAIError, OptionError

app = typer.Typer(
    name="edgeai",
    help="Quantize, export and run language models on small machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Flags renamed to the keyword arguments they set; the old spellings still work, unlisted in --help.
ALIASES = {"--ctx": "--n-ctx", "--chunks": "--n-chunks", "--temp": "--temperature",
           "--prompt-tokens": "--n-prompt", "--gen-tokens": "--n-gen"}


class _Command(TyperCommand):
    """A command that takes the old spellings in ALIASES for the flags it has (`--ctx 64`, `--ctx=64`)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        own = {opt for param in self.params for opt in getattr(param, "opts", ())}
        renamed = []
        for i, arg in enumerate(args):
            if arg == "--":  # what follows is arguments, never flags
                renamed += args[i:]
                break
            flag, eq, value = arg.partition("=")
            new = ALIASES.get(flag)
            renamed.append(new + eq + value if new in own else arg)
        return super().parse_args(ctx, renamed)


def command(name: str | None = None):
    """`app.command` for a command that takes the ALIASES."""
    return app.command(name, cls=_Command)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived: leave as Ctrl-C does (temporary files removed on the way out, by
    the `finally`/`except BaseException` blocks they were made in), with the shell's code 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _terminate(signum: int, frame) -> None:
    raise Terminated(signum)


def _fail(exc: BaseException) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@command()
def convert(
    src: Optional[Path] = typer.Argument(None, help="Hugging Face folder or .gguf file (default: the bundled SmolLM2)."),
    output: Path = typer.Option(..., "--output", "-o", help="GGUF file (or, with --format onnx, folder) to write."),
    outtype: Optional[str] = typer.Option(None, "--outtype", help="One type for all weights: f32, f16 (default), bf16, q8_0."),
    quant: Optional[str] = typer.Option(None, "--quant", help="A recipe instead: q4_0, q4_1, q5_0, q5_1, iq4_nl, iq4_xs, mxfp4, mxfp4_moe, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (--format onnx: fp32, fp16, int8, int4)."),
    method: str = typer.Option("rtn", "--method", help="rtn (no data), imatrix, awq or gptq (these need --calib)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text file (UTF-8)."),
    calib_ctx: int = typer.Option(512, "--calib-ctx", help="Tokens per calibration chunk."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Mix types to reach this many bits per weight, least measured error first."),
    target_types: Optional[str] = typer.Option(None, "--target-types", help="Comma-separated block types --target-bpw may use (default: q4_0,q4_1,iq4_nl,iq4_xs,q4_k,q5_0,q5_1,q5_k,q6_k,q8_0)."),
    prune: Optional[str] = typer.Option(None, "--prune", help="Prune before quantizing: wanda:0.5, magnitude:0.3, 2:4, wanda:2:4, layers:4, experts:0.25 (wanda, layers and experts need --calib); join steps with commas."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow PyTorch .bin checkpoints (weights_only=True)."),
    threads: int = typer.Option(0, "--threads", "-t", help="Quantization threads (0: all cores)."),
    format: str = typer.Option("gguf", "--format", help="gguf (a file) or onnx (a folder; --quant fp32|fp16|int8|int4)."),
    block_size: int = typer.Option(32, "--block-size", help="ONNX int8/int4: weights per scale (32, 64, 128)."),
    device: Optional[str] = typer.Option(None, "--device", help="ONNX: the device profile (`edgeai devices`) whose CPU sets MatMulNBits' accuracy_level (default: this machine)."),
    draft_of: Optional[Path] = typer.Option(None, "--draft-of", help="Make a draft model for speculative decoding with this target GGUF (SRC: the checkpoint it was converted from): fewer blocks (chosen on --calib text), q4_0 unless --quant; use it with --speculative draft.gguf."),
    draft_layers: Optional[int] = typer.Option(None, "--draft-layers", help="Blocks the draft keeps (default: three quarters of SRC's, rounded up)."),
) -> None:
    """Convert a checkpoint to GGUF, or to an ONNX folder for onnxruntime."""
    from edgeai.cli.progress import progress_bar
    from edgeai.converters.convert import convert as run_convert

    try:
        with progress_bar(quiet) as progress:
            path = run_convert(src, output, outtype=outtype, quant=quant, method=method, calib=calib, calib_ctx=calib_ctx,
                               target_bpw=target_bpw, target_types=target_types.split(",") if target_types else None,
                               format=format, block_size=block_size, prune=prune, device=device,
                               draft_of=draft_of, draft_layers=draft_layers, force=force, progress=progress,
                               trust_pickle=trust_pickle, threads=threads)
    except EdgeAIError as exc:
        _fail(exc)
    except (KeyboardInterrupt, Terminated) as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]interrupted:[/] {output} was not written", soft_wrap=True)
        raise typer.Exit(exc.code if isinstance(exc, Terminated) else 130)
    if not quiet:
        size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
        typer.echo(f"wrote {path} ({size / 2**20:.1f} MiB)")


@command()
def inspect(path: Path = typer.Argument(..., help="A .gguf file.")) -> None:
    """Show what an artifact holds."""
    from rich.console import Console
    from rich.table import Table

    from edgeai.inspect import inspect as run_inspect

    try:
        s = run_inspect(path)
    except EdgeAIError as exc:
        _fail(exc)
    console = Console()
    head = Table(title=f"{s.path.name}", show_header=False)
    head.add_row("architecture", s.architecture)
    head.add_row("name", s.name)
    head.add_row("tensors", f"{s.n_tensors}")
    head.add_row("parameters", f"{s.n_parameters:,}")
    head.add_row("tensor data", f"{s.n_bytes / 2**20:.2f} MiB")
    head.add_row("bits per weight", f"{s.bits_per_weight:.2f}")
    for k, v in s.other.items():
        head.add_row(k, str(v))
    console.print(head)

    hp = Table(title="hyper-parameters")
    hp.add_column("key")
    hp.add_column("value")
    for k, v in s.hparams.items():
        hp.add_row(k, str(v))
    console.print(hp)

    types = Table(title="tensors by type")
    for col in ("type", "tensors", "MiB", "bits/weight"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for kind, st in s.types.items():
        types.add_row(kind, str(st.count), f"{st.n_bytes / 2**20:.2f}", f"{8 * st.n_bytes / max(1, st.n_elements):.2f}")
    console.print(types)

    tok = Table(title="tokenizer", show_header=False)
    for k, v in s.tokenizer.items():
        if v is not None:
            tok.add_row(k, str(v))
    console.print(tok)

    if s.recipe:
        rec = Table(title="recipe", show_header=False)
        for k, v in s.recipe.items():
            if k == "tensor_types":
                from collections import Counter

                v = ", ".join(f"{t}: {n}" for t, n in Counter(v.values()).most_common())
            elif k == "fallbacks":
                v = f"{len(v)} tensor(s)" + (f", e.g. {next(iter(v))}: {next(iter(v.values()))}" if v else "")
            rec.add_row(k, str(v))
        console.print(rec)


@command("eval")
def eval_command(
    artifact: Path = typer.Argument(..., help="The .gguf file or ONNX folder to judge."),
    reference: Path = typer.Option(..., "--reference", "-r", help="F16/F32 .gguf or Hugging Face folder it should match."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
    n_ctx: int = typer.Option(512, "--n-ctx", help="Tokens per chunk; the second half of each chunk is scored."),
    n_chunks: Optional[int] = typer.Option(None, "--n-chunks", help="Score only the first N chunks (default: all)."),
    threads: int = typer.Option(0, "--threads", "-t", help="llama.cpp threads (0: all cores)."),
    backend: str = typer.Option("llama.cpp", "--backend", help="Engine that scores a .gguf ARTIFACT: llama.cpp or native "
                                "(the reference is always scored by llama.cpp)."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="ARTIFACT's KV cache type: f16, q8_0, q4_0 or keys/values "
                                           "such as q8_0/q4_0 (default: F32 in llama.cpp, f16 in native)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Perplexity, KL divergence and top-1 agreement of ARTIFACT against a reference (llama.cpp / onnxruntime logits)."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgeai.evaluate import eval as run_eval

    stderr = Console(stderr=True)
    bar = Progress(TextColumn("scoring chunks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=stderr, disable=not stderr.is_terminal, transient=True)
    task = bar.add_task("eval", total=None)
    try:
        with bar:
            r = run_eval(artifact, reference, text, n_ctx=n_ctx, n_chunks=n_chunks, threads=threads,
                         progress=lambda done, total: bar.update(task, completed=done, total=total),
                         backend=backend, kv_cache=kv_cache)
    except EdgeAIError as exc:
        _fail(exc)
    if json_output:
        typer.echo(json.dumps(r.to_json()))
        return
    from rich.table import Table

    table = Table(title=f"{artifact.name} vs {reference.name}", show_header=False)
    table.add_row("perplexity", f"{r.ppl:.4f}")
    table.add_row("reference perplexity", f"{r.ref_ppl:.4f}")
    table.add_row("KLD mean", f"{r.kld_mean:.6f}")
    table.add_row("KLD median", f"{r.kld_median:.6f}")
    table.add_row("KLD p99", f"{r.kld_p99:.6f}")
    table.add_row("top-1 agreement", f"{100 * r.top1:.2f} %")
    table.add_row("size", f"{r.size_bytes / 2**20:.2f} MiB")
    table.add_row("bits per weight", f"{r.bpw:.2f}")
    table.add_row("scored tokens", f"{r.n_tokens:,} ({r.n_chunks} chunks of {r.n_ctx})")
    Console().print(table)


# -- running models (edgeai/cli/repl.py, edgeai/cli/show.py) ---------------------------------------------
_MODEL_OPTS = dict(
    backend=typer.Option("auto", "--backend", help="auto, native, llama.cpp or onnxruntime."),
    memory_budget=typer.Option(None, "--memory-budget", help="e.g. 1.5GiB, 800MB, 60% (default: the device's)."),
    device=typer.Option(None, "--device", help="A profile from `edgeai devices`: sets threads and budget."),
    n_ctx=typer.Option(None, "--n-ctx", help="Context positions (default 2048, at most the model's)."),
    threads=typer.Option(None, "--threads", "-t", help="Threads (default: the device's, else one per performance core)."),
    kv_cache=typer.Option(None, "--kv-cache", help="KV cache type: f16 (default), q8_0 (about half the memory), q4_0 "
                          "(a quarter), or keys/values such as q8_0/q4_0."),
    speculative=typer.Option(None, "--speculative", help="Speculative decoding (native): lookup, self (layer skipping) "
                             "or a draft model's path (same vocabulary); the output is unchanged."),
    draft_tokens=typer.Option(None, "--draft-tokens", help="Most tokens drafted per verification (1-14, default 8)."),
    context_overflow=typer.Option("drop-turns", "--context-overflow",
                                  help="A full context: drop-turns (stop; the chat drops its oldest turns) or "
                                       "sink-window (keep the first tokens and the latest, go on in the same memory) or "
                                       "compact (also keep, per layer and head, what the latest tokens attend to most)."),
)


def _load(model, backend, memory_budget, device, n_ctx, threads, kv_cache, speculative=None, draft_tokens=None,
          context_overflow="drop-turns"):
    from edgeai.api import load

    try:
        return load(model, backend=backend, memory_budget=memory_budget, device=device, n_ctx=n_ctx, threads=threads,
                    kv_cache=kv_cache, speculative=speculative, draft_tokens=draft_tokens,
                    context_overflow=context_overflow)
    except EdgeAIError as exc:
        _fail(exc)


@command()
def run(
    model: Path = typer.Argument(..., help="A .gguf file or ONNX folder."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt: the user's turn in the model's chat template "
                                           "(where it has one; --raw for plain completion)."),
    raw: bool = typer.Option(False, "--raw", help="Complete the prompt as plain text, without the chat template."),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.8, "--temperature", help="Temperature (0: greedy)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (text, tokens, timings)."),
    plan: bool = typer.Option(False, "--plan", help="Show how the memory budget is split (native engine), without running."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="Answer with JSON valid against this JSON Schema file."),
    grammar: Optional[Path] = typer.Option(None, "--grammar", help="Answer in this GBNF grammar (a llama.cpp .gbnf file)."),
    regex: Optional[str] = typer.Option(None, "--regex", help="Answer with text matching this regular expression."),
    backend: str = _MODEL_OPTS["backend"], memory_budget: Optional[str] = _MODEL_OPTS["memory_budget"],
    device: Optional[str] = _MODEL_OPTS["device"], n_ctx: Optional[int] = _MODEL_OPTS["n_ctx"],
    threads: Optional[int] = _MODEL_OPTS["threads"], kv_cache: Optional[str] = _MODEL_OPTS["kv_cache"],
    speculative: Optional[str] = _MODEL_OPTS["speculative"], draft_tokens: Optional[int] = _MODEL_OPTS["draft_tokens"],
    context_overflow: str = _MODEL_OPTS["context_overflow"],
) -> None:
    """Answer PROMPT once and print it (for scripts): the chat template by default, --raw for completion.
    With --json-schema, --grammar or --regex the answer is constrained to match (exit status 1 if it
    could not be completed within --max-tokens)."""
    from edgeai.cli.show import show_plan, show_run, write_text

    if plan:
        try:
            from edgeai.api import plan as make_plan

            show_plan(make_plan(model, memory_budget=memory_budget, device=device, n_ctx=n_ctx, threads=threads,
                                kv_cache=kv_cache, speculative=speculative, draft_tokens=draft_tokens),
                      json_output=json_output)
        except EdgeAIError as exc:
            _fail(exc)
        return
    if prompt is None:
        _fail(OptionError("PROMPT is missing: edgeai run MODEL PROMPT (or --plan to show the memory plan)"))
    from edgeai.api import run as run_model

    try:
        constraint = _constraint_options(json_schema, grammar, regex)
        result = run_model(model, prompt, raw=raw, max_tokens=max_tokens, temperature=temperature, seed=seed,
                           backend=backend, memory_budget=memory_budget, device=device, n_ctx=n_ctx, threads=threads,
                           kv_cache=kv_cache, on_text=None if json_output else write_text,
                           speculative=speculative, draft_tokens=draft_tokens, context_overflow=context_overflow,
                           **constraint)
    except EdgeAIError as exc:
        _fail(exc)
    show_run(result, json_output=json_output)
    if result.incomplete:
        raise typer.Exit(1)


def _constraint_options(json_schema: Optional[Path], grammar: Optional[Path], regex: Optional[str]) -> dict:
    """`edgeai.run`'s structured-output keywords from run's flags (the files read here)."""
    from edgeai.constraints import read_constraint_file

    out: dict = {}
    if json_schema is not None:
        out["json_schema"] = read_constraint_file(json_schema, "json_schema")
    if grammar is not None:
        out["grammar"] = read_constraint_file(grammar, "grammar")
    if regex is not None:
        out["regex"] = regex
    return out


@command()
def chat(
    model: Optional[Path] = typer.Argument(None, help="A .gguf file or ONNX folder (default: the bundled SmolLM2)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    backend: str = _MODEL_OPTS["backend"], memory_budget: Optional[str] = _MODEL_OPTS["memory_budget"],
    device: Optional[str] = _MODEL_OPTS["device"], n_ctx: Optional[int] = _MODEL_OPTS["n_ctx"],
    threads: Optional[int] = _MODEL_OPTS["threads"], kv_cache: Optional[str] = _MODEL_OPTS["kv_cache"],
    speculative: Optional[str] = _MODEL_OPTS["speculative"], draft_tokens: Optional[int] = _MODEL_OPTS["draft_tokens"],
    context_overflow: str = _MODEL_OPTS["context_overflow"],
    think: Optional[str] = typer.Option(None, "--think", help="Thinking models: on, off, or gpt-oss's effort low, "
                                        "medium, high (as /think; default: the template's)."),
) -> None:
    """Chat with a model in the terminal (/help inside lists the commands)."""
    from edgeai.cli.repl import chat as run_chat

    try:
        with _load(model, backend, memory_budget, device, n_ctx, threads, kv_cache, speculative, draft_tokens,
                   context_overflow) as m:
            run_chat(m, system=system, think=think)
    except EdgeAIError as exc:  # a model that does not load, a --think it cannot take
        _fail(exc)


@command()
def serve(
    model: Optional[Path] = typer.Argument(None, help="A .gguf file or ONNX folder (default: the bundled SmolLM2)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8080, "--port", help="TCP port (0: any free one)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGEAI_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (or set EDGEAI_API_KEY)."),
    name: Optional[str] = typer.Option(None, "--name", help="The model's name in the APIs (default: the file's stem)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting for the model before 503."),
    keep_alive: float = typer.Option(-1, "--keep-alive", help="Seconds the model stays loaded when idle (-1: for ever)."),
    backend: str = _MODEL_OPTS["backend"], memory_budget: Optional[str] = _MODEL_OPTS["memory_budget"],
    device: Optional[str] = _MODEL_OPTS["device"], n_ctx: Optional[int] = _MODEL_OPTS["n_ctx"],
    threads: Optional[int] = _MODEL_OPTS["threads"], kv_cache: Optional[str] = _MODEL_OPTS["kv_cache"],
    context_overflow: str = _MODEL_OPTS["context_overflow"],
    parallel: int = typer.Option(1, "--parallel", help="Requests decoded together in one batched step (native "
                                 "backend: sequence slots, each with its own KV cache of --n-ctx positions); the rest "
                                 "wait in the queue."),
) -> None:
    """Serve a model over HTTP: OpenAI's /v1/chat/completions, /v1/completions, /v1/models and ollama's
    /api/chat, /api/generate, /api/tags (streaming as server-sent events / NDJSON)."""
    from edgeai.server import serve

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    try:
        serve(model, host=host, port=port, api_key=api_key, name=name, max_queue=max_queue, keep_alive=keep_alive,
              backend=backend, memory_budget=memory_budget, device=device, n_ctx=n_ctx, threads=threads,
              kv_cache=kv_cache, context_overflow=context_overflow, parallel=parallel, ready=lambda url: print(f"serving on {url} (OpenAI: {url}/v1, ollama: {url}/api)",
                                                         flush=True))
    except EdgeAIError as exc:
        _fail(exc)


@command()
def bench(
    model: Path = typer.Argument(..., help="A .gguf file (or ONNX folder) every backend runs."),
    backend: list[str] = typer.Option(["auto"], "--backend", help="Repeat to compare: native, llama.cpp, onnxruntime."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Threads for every backend (default: one per performance core)."),
    n_prompt: int = typer.Option(128, "--n-prompt", help="Prompt length for prefill."),
    n_gen: int = typer.Option(32, "--n-gen", help="Tokens decoded per run."),
    repeats: int = typer.Option(3, "--repeats", help="Runs per backend (medians are shown)."),
    memory_budget: Optional[str] = _MODEL_OPTS["memory_budget"], kv_cache: Optional[str] = _MODEL_OPTS["kv_cache"],
    speculative: Optional[str] = _MODEL_OPTS["speculative"], draft_tokens: Optional[int] = _MODEL_OPTS["draft_tokens"],
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Prefill/decode tokens/s, time to first token and peak memory of backends on the same file."""
    from edgeai.bench import bench as run_bench
    from edgeai.bench import roofline
    from edgeai.cli.show import show_bench

    try:
        results = run_bench(model, backend, threads=threads, n_prompt=n_prompt, n_gen=n_gen, repeats=repeats,
                            memory_budget=memory_budget, kv_cache=kv_cache, speculative=speculative,
                            draft_tokens=draft_tokens)
        show_bench(model, results, roofline(model, n_prompt + n_gen // 2), n_prompt=n_prompt, n_gen=n_gen,
                   repeats=repeats, json_output=json_output)
    except EdgeAIError as exc:
        _fail(exc)


@command()
def devices(
    detect: bool = typer.Option(False, "--detect", help="Describe this machine (short bandwidth probes) and name the closest profile."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the device profiles, or describe this machine."""
    from edgeai.cli.show import show_devices
    from edgeai.devices.report import devices as list_devices

    try:
        show_devices(list_devices(detect=detect), json_output=json_output)
    except EdgeAIError as exc:
        _fail(exc)


@command()
def fit(
    model: Optional[Path] = typer.Argument(None, help="A .gguf file or Hugging Face folder (default: the bundled SmolLM2)."),
    device: str = typer.Option(..., "--device", help="A profile from `edgeai devices`, or 'this' for this machine."),
    memory_budget: Optional[str] = _MODEL_OPTS["memory_budget"], n_ctx: Optional[int] = _MODEL_OPTS["n_ctx"],
    kv_cache: Optional[str] = _MODEL_OPTS["kv_cache"],
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Will MODEL fit DEVICE, with which memory split, how fast; for a checkpoint, which recipe to use."""
    from edgeai.cli.show import show_fit
    from edgeai.fit import fit as run_fit

    try:
        show_fit(run_fit(model, device, memory_budget=memory_budget, n_ctx=n_ctx, kv_cache=kv_cache), json_output=json_output)
    except EdgeAIError as exc:
        _fail(exc)


def main() -> None:
    """Entry point of the `edgeai` script."""
    import signal

    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        # a signal the caller ignores (nohup ignores SIGHUP) stays ignored
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _terminate)
    try:
        app()
    except BrokenPipeError:  # `edgeai inspect ... | head`
        sys.stderr.close()


if __name__ == "__main__":
    main()
