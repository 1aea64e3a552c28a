"""Conversion speed and memory: `edgeai convert` against llama.cpp's own `convert_hf_to_gguf.py`.

Both tools convert the same Hugging Face checkpoint to the same output type. Each run of each tool
is its own subprocess, and the tools take turns (edgeai, llama.cpp, edgeai, llama.cpp, ...) so that
drift in the machine's state hits both. For every run the script measures:

* wall time, from starting the child to reaping it;
* peak resident memory of the child (`ru_maxrss` from `os.wait4`). On Linux it starts from this
  script's own peak (recorded when the child execs), so the script stays small and reports that
  floor; the model is never loaded here;
* the size of the GGUF written (taken from the last run of each tool).

It prints the medians side by side with the ratio edgeai / llama.cpp (below 1: edgeai is faster,
smaller or lighter), plus the exact commands so that anyone can rerun them.

Neither run drops the page cache: the checkpoint is read once beforehand, so both tools read it from
memory. Thread variables (OMP_NUM_THREADS and the like) are removed from both children's
environment, so each tool uses its own default: edgeai encodes on every core. edgeai fsyncs its
output before renaming it into place; convert_hf_to_gguf.py does not fsync, so edgeai's times
include that flush and llama.cpp's do not.

Run it by hand (it is not a test):

    .venv/bin/python benchmarks/convert_vs_llamacpp.py --outtype f16 --runs 5
    .venv/bin/python benchmarks/convert_vs_llamacpp.py --outtype q8_0 --json

Defaults: the checkpoint is SmolLM2-135M-Instruct rebuilt as a float32 Hugging Face folder from the
GGUF bundled with edgeai, cached in ~/.cache/edgeai-bench/smollm2-hf-f32 (delete it to rebuild). The
llama.cpp converter comes from the source distribution of the installed llama-cpp-python, downloaded
with pip and extracted into ~/.cache/edgeai-bench once. Pass --checkpoint and --llama-cpp-src to use
your own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import multiprocessing
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

CACHE = Path.home() / ".cache" / "edgeai-bench"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # spelled the same by both tools
LLAMA_CPP = Path("vendor") / "llama.cpp"  # inside the llama-cpp-python source distribution
# Removed from both children's environment so that each tool picks its own thread count.
THREAD_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "NUMEXPR_MAX_THREADS",
)
MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024  # unit of ru_maxrss: bytes on macOS, KiB on Linux
MIB = 2**20
# Modules whose pip distribution has another name.
PIP_NAMES = {"yaml": "pyyaml", "google": "protobuf", "sklearn": "scikit-learn", "PIL": "pillow"}
# Modules that convert_hf_to_gguf.py takes from llama.cpp's own tree, not from pip.
LLAMA_CPP_MODULES = {"gguf", "conversion"}


def build_hf_checkpoint(gguf_path: Path, dest: Path) -> Path:
    """Rebuild a GGUF model as a float32 Hugging Face folder (safetensors, config, tokenizer) at `dest`.

    transformers dequantizes the GGUF's weights to float32 and turns its vocabulary back into a
    tokenizer; both are saved with `save_pretrained`. The folder is built beside `dest` and renamed
    into place when complete, so an existing `dest` is always whole and is returned as it is (the
    cache). Tests that need a real-size checkpoint can copy this function: it uses only torch and
    transformers, not edgeai.
    """
    if dest.is_dir():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(dest)
    return dest


def build_default_checkpoint(dest: Path) -> Path:
    """Build the bundled SmolLM2-135M-Instruct GGUF as a float32 HF folder at `dest`."""
    from edgeai.paths import default_model_path

    return build_hf_checkpoint(default_model_path(), dest)


def default_checkpoint(console: Console) -> Path:
    """The default checkpoint (~/.cache/edgeai-bench/smollm2-hf-f32), built once in a separate process.

    A child's peak RSS starts from its parent's (Linux records the parent's high-water mark when
    the child execs), so this process must never hold the model: torch and transformers stay out of it.
    """
    dest = CACHE / "smollm2-hf-f32"
    if not dest.is_dir():
        console.print(f"building the default checkpoint in {dest} (once)")
        CACHE.mkdir(parents=True, exist_ok=True)
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            pool.submit(build_default_checkpoint, dest).result()
    return dest


def fetch_llama_cpp_src(console: Console) -> Path:
    """Download and extract the source distribution of the installed llama-cpp-python, once.

    Returns the extracted folder, cached as ~/.cache/edgeai-bench/llama_cpp_python-VERSION.
    """
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("llama-cpp-python is not installed; pass --llama-cpp-src with an extracted source distribution")
    dest = CACHE / f"llama_cpp_python-{version}"
    if dest.is_dir():
        return dest
    console.print(f"downloading the llama-cpp-python {version} source distribution into {dest} (once)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".download-") as tmp:
        # pip prepares the sdist's metadata even with --no-deps, which needs its build backend
        # (scikit-build-core). It is not in the venv, so build isolation stays on and pip fetches it.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             f"llama-cpp-python=={version}", "-d", tmp],
            check=True, stdout=sys.stderr,
        )
        sdist = next(Path(tmp).glob("*.tar.gz"))
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, **safe)
        next(p for p in Path(tmp).iterdir() if p.is_dir()).rename(dest)
    return dest


def missing_module_hint(output: str, program: str, tree: Path | None = None) -> str | None:
    """A clear message if `output` shows that `program` misses a Python module, else None.

    `tree` is the llama.cpp folder whose own modules (gguf-py, conversion) are not installed by pip.
    """
    match = re.search(r"No module named '([^']+)'", output)
    if match is None:
        return None
    module = match.group(1)
    top = module.split(".")[0]
    if tree is not None and top in LLAMA_CPP_MODULES:
        return f"{program} cannot import {module!r} from {tree}; that folder looks incomplete"
    package = PIP_NAMES.get(top, top.replace("_", "-"))
    return (
        f"{program} needs the module {module!r}, which is not installed; "
        f"run `{sys.executable} -m pip install {package}`"
    )


def check_llama_cpp(python: str, script: Path, env: dict[str, str]) -> None:
    """Exit with a clear message unless `script --help` runs: the modules it imports at start-up are there.

    Modules imported later, during a conversion, are reported by `run_once` if a run fails.
    """
    done = subprocess.run([python, str(script), "--help"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        hint = missing_module_hint(output, script.name, script.parent)
        sys.exit(hint or f"{script} --help failed:\n{output[-3000:]}")


def warm_page_cache(folder: Path) -> None:
    """Read every file of the checkpoint once, so that no run pays for a cold disk.

    One small buffer is reused: this process's own peak RSS is the floor of every child's.
    """
    buffer = bytearray(1 << 20)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass


@dataclass
class Tool:
    """One converter under test: its command, its environment and what its runs measured."""

    label: str
    argv: list[str]
    env: dict[str, str]
    output: Path
    shown_env: str = ""  # environment assignments to show in front of the command
    tree: Path | None = None  # llama.cpp folder the tool imports its own modules from
    wall_s: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)
    output_mib: float = 0.0

    def command(self) -> str:
        """The command line, ready to paste into a shell."""
        return f"{self.shown_env} {shlex.join(self.argv)}".strip()

    def summary(self) -> dict:
        """Every run's measurements and their medians, for the report."""
        return {
            "command": self.command(),
            "wall_s": self.wall_s,
            "peak_rss_mib": self.peak_rss_mib,
            "median_wall_s": statistics.median(self.wall_s),
            "median_peak_rss_mib": statistics.median(self.peak_rss_mib),
            "output_mib": self.output_mib,
        }


def run_once(tool: Tool, log: Path, keep_output: bool) -> None:
    """Run `tool` once as a child process and record its wall time, peak RSS and output size.

    The child's output goes to `log`. A failed run ends the benchmark with the child's last lines
    (and, when a module is missing, which `pip install` fixes it). The GGUF written is deleted
    unless `keep_output`.
    """
    with open(log, "wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(
            tool.argv, env=tool.env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen
    if proc.returncode != 0:
        output = log.read_text(errors="replace")
        hint = missing_module_hint(output, tool.label, tool.tree)
        sys.exit(f"{tool.label} failed (exit {proc.returncode}): {tool.command()}\n{hint or output[-3000:]}")
    tool.wall_s.append(wall)
    tool.peak_rss_mib.append(usage.ru_maxrss * MAXRSS_BYTES / MIB)
    tool.output_mib = tool.output.stat().st_size / MIB
    if not keep_output:
        tool.output.unlink()


def versions(llama_cpp_src: Path) -> dict[str, str]:
    """Versions of what is being compared, for the report."""
    found = {"python": sys.version.split()[0], "llama.cpp source": llama_cpp_src.name}
    for dist in ("edgeai", "torch", "transformers"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def print_report(report: dict) -> None:
    """Print the side-by-side table, the setting and the commands with rich."""
    ours, theirs, ratio = report["edgeai"], report["llama.cpp"], report["ratio"]
    console = Console()
    title = f"{Path(report['checkpoint']).name} -> {report['outtype']}, median of {report['runs']} runs"
    table = Table(title=title)
    table.add_column("")
    for column in ("edgeai", "llama.cpp", "edgeai / llama.cpp"):
        table.add_column(column, justify="right")
    rows = (
        ("wall time (s)", "median_wall_s", "wall", ".2f"),
        ("peak RSS (MiB)", "median_peak_rss_mib", "peak_rss", ".0f"),
        ("output (MiB)", "output_mib", "output_size", ".1f"),
    )
    for label, key, ratio_key, fmt in rows:
        table.add_row(label, format(ours[key], fmt), format(theirs[key], fmt), f"{ratio[ratio_key]:.3f}")
    console.print(table)
    console.print(
        f"cores: {report['cores']}; unset for both: {', '.join(THREAD_VARS)}\n"
        f"peak RSS floor (this script's own peak): {report['rss_floor_mib']:.0f} MiB\n"
        + "; ".join(f"{k} {v}" for k, v in report["versions"].items()),
        highlight=False,
    )
    console.print("commands:", highlight=False)
    for tool in ("edgeai", "llama.cpp"):
        console.print(f"  {report[tool]['command']}", highlight=False, markup=False, soft_wrap=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="Hugging Face folder (default: SmolLM2-135M-Instruct, float32)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16", help="output type for both tools (default: f16)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool (default: 3)")
    parser.add_argument(
        "--llama-cpp-src", type=Path,
        help="extracted llama-cpp-python source distribution (default: download the installed version's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def make_tools(checkpoint: Path, script: Path, outtype: str, work: Path) -> list[Tool]:
    """edgeai and llama.cpp, each writing into `work`, with the same environment but for PYTHONPATH."""
    edgeai_cli = Path(sys.executable).parent / "edgeai"
    if not edgeai_cli.is_file():
        sys.exit(f"{edgeai_cli} does not exist; run this script with the Python of edgeai's virtualenv")
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    gguf_py = str(script.parent / "gguf-py")  # llama.cpp's own gguf package, first on the path
    their_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (gguf_py, env.get("PYTHONPATH")) if p)}
    ours_out, theirs_out = work / f"edgeai-{outtype}.gguf", work / f"llamacpp-{outtype}.gguf"
    ours = [str(edgeai_cli), "convert", str(checkpoint), "-o", str(ours_out), "--outtype", outtype, "--force", "--quiet"]
    theirs = [sys.executable, str(script), str(checkpoint), "--outfile", str(theirs_out), "--outtype", outtype]
    return [
        Tool("edgeai", ours, env, ours_out),
        Tool("llama.cpp", theirs, their_env, theirs_out, f"PYTHONPATH={shlex.quote(gguf_py)}", script.parent),
    ]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its report."""
    args = parse_args(argv)
    console = Console(stderr=True)  # progress; stdout holds only the report
    checkpoint = (args.checkpoint or default_checkpoint(console)).resolve()
    if not (checkpoint / "config.json").is_file():
        sys.exit(f"{checkpoint} is not a Hugging Face checkpoint folder (no config.json)")
    llama_cpp_src = (args.llama_cpp_src or fetch_llama_cpp_src(console)).resolve()
    script = llama_cpp_src / LLAMA_CPP / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"{script} does not exist; --llama-cpp-src must be an extracted llama-cpp-python sdist")

    with tempfile.TemporaryDirectory(prefix="edgeai-bench-") as tmp:
        ours, theirs = make_tools(checkpoint, script, args.outtype, Path(tmp))
        check_llama_cpp(sys.executable, script, theirs.env)
        warm_page_cache(checkpoint)
        for run in range(args.runs):
            for tool in (ours, theirs):
                run_once(tool, Path(tmp) / f"{tool.label}.log", keep_output=run == args.runs - 1)
                console.print(
                    f"run {run + 1}/{args.runs} {tool.label}: {tool.wall_s[-1]:.2f} s, "
                    f"{tool.peak_rss_mib[-1]:.0f} MiB",
                    highlight=False,
                )

    ours_summary, theirs_summary = ours.summary(), theirs.summary()
    report = {
        "checkpoint": str(checkpoint),
        "outtype": args.outtype,
        "runs": args.runs,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "rss_floor_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * MAXRSS_BYTES / MIB,
        "versions": versions(llama_cpp_src),
        "edgeai": ours_summary,
        "llama.cpp": theirs_summary,
        "ratio": {
            "wall": ours_summary["median_wall_s"] / theirs_summary["median_wall_s"],
            "peak_rss": ours_summary["median_peak_rss_mib"] / theirs_summary["median_peak_rss_mib"],
            "output_size": ours_summary["output_mib"] / theirs_summary["output_mib"],
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
