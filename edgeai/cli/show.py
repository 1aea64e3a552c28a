"""What `edgeai run`, `bench`, `devices` and `fit` print: thin terminal layers (rich) over what the
library functions they are named after return."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeai.api import RunResult
from edgeai.budget import format_bytes
from edgeai.devices.report import DeviceReport


def write_text(piece: str) -> None:
    """One piece of an answer to stdout as it is generated (`edgeai.run`'s on_text)."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def show_run(result: RunResult, *, json_output: bool) -> None:
    """After `edgeai.run`: the answer as one JSON object, or the end of the streamed text; an empty
    answer says why, and so does an answer incomplete under a constraint (on stderr)."""
    if json_output:
        t = result.timings
        print(json.dumps({"text": result.text, "finish_reason": result.finish_reason.value,
                          "incomplete": result.incomplete,
                          "prompt_format": "chat template" if result.chat_template else "raw",
                          "backend": result.backend, "prompt_tokens": t.prompt_tokens + t.cached_tokens,
                          "generated_tokens": t.generated_tokens, "ttft_s": t.prompt_seconds,
                          "prefill_tps": t.prefill_tps, "decode_tps": t.decode_tps}, ensure_ascii=False))
    else:
        print()
        if not result.text.strip():
            print(f"(no text: the model ended at once, finish reason {result.finish_reason.value!r}"
                  + ("; --raw completes the prompt without the chat template)" if result.chat_template else ")"),
                  file=sys.stderr)
    if result.incomplete:
        print(f"(incomplete: the answer does not yet match the constraint; finish reason {result.finish_reason.value!r}, "
              "raise --max-tokens)", file=sys.stderr)


def show_bench(path: Path, results, roof, *, n_prompt: int, n_gen: int, repeats: int, json_output: bool) -> None:
    """Print `edgeai.bench.bench`'s results (ratios against the first) and the roofline."""
    from dataclasses import asdict

    base = results[0]

    def ratios(r):
        return {"prefill": r.prefill_tps / base.prefill_tps, "decode": r.decode_tps / base.decode_tps,
                "ttft": r.ttft_s / base.ttft_s, "peak_rss": r.peak_rss_bytes / base.peak_rss_bytes}

    if json_output:
        print(json.dumps({"results": [{**r.to_json(), "ratio_vs_first": ratios(r)} for r in results],
                          "roofline": asdict(roof) if roof else None}))
        return
    threads_label = f"{base.threads} thread{'s' if base.threads > 1 else ''}"
    table = Table(title=f"{Path(path).name}: {n_prompt}-token prompt, {n_gen} decoded, {threads_label}, "
                        f"median of {repeats} runs")
    for col in ("backend", "prefill tok/s", "decode tok/s", "of roofline", "first token", "peak memory"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in results:
        q = ratios(r)
        vs = (lambda x: "") if r is base else (lambda x: f" ({x:.2f}x)")
        table.add_row(r.backend, f"{r.prefill_tps:.1f}{vs(q['prefill'])}", f"{r.decode_tps:.1f}{vs(q['decode'])}",
                      f"{100 * r.decode_tps / roof.decode_tps:.0f}%" if roof else "-",
                      f"{r.ttft_s * 1000:.0f} ms{vs(q['ttft'])}", f"{format_bytes(r.peak_rss_bytes)}{vs(q['peak_rss'])}")
    console = Console()
    console.print(table)
    for r in results:
        if r.speculative:
            console.print(f"{r.backend}: speculative ({r.speculative}), {100 * (r.acceptance_rate or 0):.0f}% of drafted "
                          f"tokens accepted, {r.mean_accepted_length or 0:.2f} per verification")
    if len(results) > 1:
        console.print(f"ratios are against {base.backend}")
    if roof:
        console.print(f"roofline: {format_bytes(roof.bytes_per_token)} read per token / {roof.memory_bandwidth / 1e9:.1f} GB/s "
                      f"measured memory bandwidth = {roof.decode_tps:.0f} tok/s")


def _profile_json(p) -> dict:
    return {"name": p.name, "title": p.title, "arch": p.arch, "cpu": p.cpu, "memory": p.memory_bytes,
            "performance_cores": p.performance_cores, "efficiency_cores": p.efficiency_cores, "isa": list(p.isa),
            "memory_bandwidth": p.memory_bandwidth, "decode_bandwidth": p.decode_bandwidth, "storage": p.storage, "storage_read": p.storage_read,
            "threads": p.threads, "default_budget": p.default_budget, "sources": p.sources}


def _llama_cpp_isa(isa: tuple[str, ...]) -> str:
    """Which of this CPU's features the installed llama.cpp was built to use, as one line."""
    try:
        from edgeai.runtimes.llamacpp_check import isa_use

        use = isa_use(isa)
    except (ImportError, OSError) as exc:  # no llama-cpp-python, or its library does not load
        return f"not usable: {exc}"
    used = [f for f, on in use.items() if on]
    unused = [f for f, on in use.items() if not on]
    return f"uses {', '.join(used) or 'none'}" + (f"; built without {', '.join(unused)}" if unused else "")


def show_devices(report: DeviceReport, *, json_output: bool) -> None:
    """Print `edgeai.devices.report.devices`' report: the profiles, or this machine and its closest profile."""
    console = Console()
    me = report.machine
    if me is not None:
        near = report.closest
        if json_output:
            from edgeai.runtimes.llamacpp_check import isa_use

            print(json.dumps({"machine": _profile_json(me), "closest": near.name, "distance": report.distance,
                              "llama_cpp_isa": isa_use(me.isa)}))
            return
        table = Table(title="this machine", show_header=False)
        table.add_row("cpu", f"{me.cpu} ({me.arch})")
        table.add_row("cores", f"{me.performance_cores} performance + {me.efficiency_cores} efficiency (physical; "
                                f"{me.threads} threads by default)")
        table.add_row("memory", f"{format_bytes(me.memory_bytes)} ({format_bytes(me.memory_bytes - me.os_reserve_bytes)} available)")
        table.add_row("ISA features", ", ".join(me.isa) or "none of the listed")
        table.add_row("llama.cpp build", _llama_cpp_isa(me.isa))
        table.add_row("memory bandwidth", f"{me.memory_bandwidth / 1e9:.1f} GB/s ({me.sources['memory_bandwidth_gbs']})")
        table.add_row("storage read", f"{me.storage_read / 1e9:.2f} GB/s ({me.sources['storage_read_gbs']})")
        table.add_row("closest profile", f"{near.name}: {near.title}")
        console.print(table)
        return
    if json_output:
        print(json.dumps([_profile_json(p) for p in report.profiles.values()]))
        return
    table = Table(title="device profiles (sources: devices/profiles/*.json)")
    for col in ("name", "device", "memory", "cores P+E", "ISA", "memory GB/s (decode)", "storage GB/s", "threads", "budget"):
        table.add_column(col)
    for p in report.profiles.values():
        table.add_row(p.name, p.title, format_bytes(p.memory_bytes), f"{p.performance_cores}+{p.efficiency_cores}",
                      " ".join(p.isa), f"{p.memory_bandwidth / 1e9:.1f} ({p.decode_bandwidth / 1e9:.1f})", f"{p.storage_read / 1e9:.2f} ({p.storage})",
                      str(p.threads), format_bytes(p.default_budget))
    console.print(table)


def show_fit(report, *, json_output: bool) -> None:
    """Print `edgeai.fit.fit`'s report: the split, whether it fits, the recipe to use."""
    profile = report.estimates[0].device
    if json_output:
        print(json.dumps(report.to_json()))
        return
    console = Console()
    best = report.best
    first = report.estimates[0]
    console.print(f"[bold]{report.path.name}[/] on [bold]{profile.title}[/]: budget {format_bytes(first.budget)}, "
                  f"context {first.n_ctx} tokens")
    table = Table()
    for col in ("recipe" if report.kind == "checkpoint" else "file", "weights", "KV cache", "scratch", "total",
                "fits", "decode tok/s (est.)"):
        table.add_column(col, justify="left" if col in ("recipe", "file", "fits") else "right")
    for e in report.estimates:
        fits = "yes" if e.fits else ("streaming experts" if e.fits_streaming else "no")
        table.add_row(e.label, format_bytes(e.weights.total), format_bytes(e.kv_bytes), format_bytes(e.scratch_bytes),
                      format_bytes(e.needed), fits, f"{e.decode_tps:.1f}" if e.decode_tps else "?")
    console.print(table)
    if best is None:
        smallest = min(report.estimates, key=lambda e: e.minimum)
        console.print(f"[red]does not fit[/]: needs at least {format_bytes(smallest.minimum)}"
                      f"{' (' + smallest.label + ')' if report.kind == 'checkpoint' else ''}; "
                      f"the budget is {format_bytes(smallest.budget)}")
    elif report.kind == "checkpoint":
        console.print(f"convert with [bold]--quant {best.label}[/]" if best.label not in ("f16", "q8_0")
                      else f"convert with [bold]--outtype {best.label}[/]")
    else:
        how = "all weights resident" if best.fits else (
            f"{format_bytes(best.resident_expert_bytes)} of {format_bytes(best.weights.experts)} expert weights cached, "
            "the rest streamed from storage")
        console.print(f"[green]fits[/]: {how}; about {best.decode_tps:.0f} tokens/s decode "
                      f"({format_bytes(best.bytes_per_token_memory + best.bytes_per_token_storage)} read per token)")


def show_plan(plan, *, json_output: bool) -> None:
    """Print a memory plan (`runtimes.plan.MemoryPlan`): each part, its size and how it is held."""
    if json_output:
        print(json.dumps(plan.to_json()))
        return
    from rich.console import Console
    from rich.table import Table

    budget = f"budget {format_bytes(plan.budget)}" if plan.budget is not None else "no budget"
    table = Table(title=f"{plan.path.name}: memory plan ({budget}, n_ctx {plan.n_ctx})", title_justify="left")
    for col, justify in (("part", "left"), ("bytes", "right"), ("how", "left")):
        table.add_column(col, justify=justify)
    for name, size, how in plan.rows():
        table.add_row(name, format_bytes(size), how)
    table.add_row("[bold]total[/]", f"[bold]{format_bytes(plan.total)}[/]", f"smallest budget that runs: {format_bytes(plan.minimum)}")
    console = Console()
    console.print(table)
    if plan.slots:  # an MoE's experts streamed
        console.print(f"Experts are streamed from {plan.path.name}: a token that misses the cache reads "
                      f"{format_bytes(plan.slot_bytes)} per expert from disk, so decode runs at the disk's speed.")
    elif plan.layer_slots:  # a dense model's layers streamed: there are no experts to speak of
        console.print(f"Layers are streamed from {plan.path.name}: every token reads all {plan.n_layer} layers' "
                      f"matrices ({format_bytes(plan.layer_matrices)}) from disk, so decode runs at the disk's speed.")
