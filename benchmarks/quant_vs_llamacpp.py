"""Quantization quality: edgeai's quantizer against llama.cpp's own (`llama-quantize`), at matching sizes.

Both tools quantize SmolLM2-135M-Instruct, and every file is judged by the same evaluator, `edgeai eval`
(llama.cpp computes the logits): perplexity, KL divergence from the F16 reference (mean and 99th
percentile, nats per token) and top-1 agreement with it, on an evaluation text that differs from
the calibration text.

* reference: `edgeai convert CHECKPOINT -o ref-f16.gguf --outtype f16`;
* llama.cpp: `llama-imatrix` on the reference and the calibration text, then `llama-quantize` from
  the reference for each of `LLAMA_CPP_CONFIGS` (a type, with or without the importance matrix);
* edgeai: `edgeai convert ref-f16.gguf --quant RECIPE --method METHOD [--calib calib.txt]` for each of
  `EDGEAI_CONFIGS` (the same input llama.cpp quantizes, so Q8_0 can match it byte for byte;
  `--edgeai-source checkpoint` starts from the float32 checkpoint instead); when `edgeai convert
  --help` offers `--target-bpw`, also at the exact bits per weight of each of llama.cpp's files named
  in `TARGET_BPW`, choosing among FAIR_TYPES (no Q4_1/Q5_1, see there) or among every type.

The report is one table (tool, type or recipe, method, size, bits per weight, wall time of the
quantization, PPL, KLD mean, KLD p99, top-1), sorted by size; then, for each llama.cpp file made with
the importance matrix, the edgeai file closest in size (ties: the lower KLD) and the KLD ratio
ours / theirs (below 1: edgeai loses less), once among edgeai's fair files (no Q4_1/Q5_1) and once
among all. Every command is printed so that anyone can rerun it.

Times: the wall time of each quantizing command. llama.cpp's rows start from the F16 reference
(converted once, its time printed), and so do edgeai's (unless --edgeai-source checkpoint). llama-imatrix runs once and its
time is shown after the '+' of the rows that use its matrix; edgeai's calibration runs inside each
`edgeai convert`, so its rows include it. Everything gets the same thread count (--threads).

Texts, deterministic and offline (pass --calib / --text to use your own):
* calibration: docstrings of a fixed list of standard-library modules (`ast.get_docstring`, at most
  CALIB_CHARS characters, spread over the modules), from this Python's standard library;
* evaluation: the license texts of the packages installed beside this Python (site-packages
  `*.dist-info`), each line kept once. It changes when the installed packages change: its sha256
  is printed.
Both tools calibrate on the same chunks: llama-imatrix gets `--chunks` = what edgeai uses
(whole chunks of CALIB_CTX tokens, at most edgeai's DEFAULT_MAX_TOKENS tokens).

llama.cpp's tools (llama-imatrix, llama-quantize, llama-perplexity) are built with CMake from the
llama.cpp vendored in the llama-cpp-python source distribution (fetched as convert_vs_llamacpp.py
does), CPU only, into ~/.cache/edgeai-bench/llama.cpp-build, when they are missing there. That takes
several minutes on two cores, once. llama-perplexity cross-checks the evaluator: its PPL of the
reference should match the reference PPL that `edgeai eval` reports.

Run it by hand (it is not a test):

    .venv/bin/python benchmarks/quant_vs_llamacpp.py --chunks 20
    .venv/bin/python benchmarks/quant_vs_llamacpp.py --edgeai q4_k_m:gptq --edgeai q4_k_m:imatrix --json

Files, logs, texts and report.json are kept in ~/.cache/edgeai-bench/quant-vs-llamacpp (--work) so
the printed commands can be rerun (`--show WORK/report.json` prints the report again); each run
overwrites them. The default checkpoint is the one of
convert_vs_llamacpp.py: SmolLM2-135M-Instruct rebuilt as a float32 Hugging Face folder from the GGUF
bundled with edgeai. That GGUF is Q4_1, so the "full precision" weights already lie on a 4-bit grid:
read the 4-bit results with that in mind, and pass --checkpoint for a real float checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_vs_llamacpp as base  # noqa: E402  (the checkpoint and the llama-cpp-python sdist)

# ---------------------------------------------------------------------------------------------------
# What is compared. Extend these tables; --edgeai RECIPE:METHOD on the command line replaces EDGEAI_CONFIGS.

# edgeai: (recipe for --quant, --method). Calibrated methods get --calib.
EDGEAI_CONFIGS: tuple[tuple[str, str], ...] = (
    ("q4_k_m", "rtn"), ("q4_k_m", "imatrix"), ("q4_k_m", "awq"),
    ("q4_0", "rtn"), ("q4_0", "imatrix"), ("q4_0", "awq"),
    ("iq4_nl", "imatrix"), ("iq4_xs", "imatrix"),
    ("q8_0", "rtn"), ("q8_0", "imatrix"),
)
# llama.cpp: (llama-quantize type, with the importance matrix).
LLAMA_CPP_CONFIGS: tuple[tuple[str, bool], ...] = (
    ("Q4_K_M", True), ("IQ4_XS", True), ("Q4_0", True), ("Q8_0", True),
    ("Q4_K_M", False), ("Q8_0", False),
)
# Block types that cannot reproduce a Q4_1 block exactly. The default checkpoint's weights are a Q4_1
# GGUF dequantized, so Q4_1 (and Q5_1, whose grid contains Q4_1's) would win by undoing that
# rounding, not by quantizing better: mixes limited to these types are the fair comparison.
FAIR_TYPES = ("q4_0", "iq4_nl", "iq4_xs", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
# With `edgeai convert --target-bpw`: edgeai at the exact bpw of llama.cpp's (type, imatrix) file, by
# method, choosing among FAIR_TYPES (True) or every type edgeai writes (False).
TARGET_BPW: tuple[tuple[tuple[str, bool], str, bool], ...] = (
    (("IQ4_XS", True), "imatrix", True), (("IQ4_XS", True), "awq", True),
    (("Q4_K_M", True), "imatrix", True), (("Q4_K_M", True), "awq", True),
    (("Q4_K_M", True), "imatrix", False), (("IQ4_XS", True), "imatrix", False),
)
RTN_METHODS = ("rtn",)  # methods that take no --calib

# ---------------------------------------------------------------------------------------------------

CACHE = base.CACHE
BUILD_DIR = CACHE / "llama.cpp-build"
WORK_DIR = CACHE / "quant-vs-llamacpp"
BUILD_TARGETS = ("llama-imatrix", "llama-quantize", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",  # no downloads (newer trees use LLAMA_OPENSSL, older LLAMA_CURL)
    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF",  # CPU only
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
)
CALIB_CTX = 512  # tokens per calibration chunk, both tools
CALIB_CHARS = 70_000  # at most; about 59k characters, 15k tokens of SmolLM2's tokenizer: 29 chunks of 512
MIN_DOC_CHARS = 200  # shorter docstrings are mostly one-line summaries
STDLIB_MODULES = (
    "argparse", "asyncio/events", "asyncio/tasks", "base64", "bisect", "calendar", "collections",
    "concurrent/futures/_base", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email/message", "enum", "fractions", "ftplib", "functools", "gettext", "glob",
    "heapq", "hmac", "html/parser", "http/client", "http/cookiejar", "imaplib", "inspect", "ipaddress",
    "json/decoder", "json/encoder", "locale", "logging", "logging/handlers", "mailbox", "mimetypes",
    "multiprocessing/pool", "numbers", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random",
    "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "turtle", "typing", "unittest/case", "unittest/mock", "urllib/parse", "urllib/request",
    "uuid", "warnings", "weakref", "xml/dom/minidom", "zipfile",
)
LICENSE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)
MIB = 2**20


# --- texts ------------------------------------------------------------------------------------------

def stdlib_docstrings(limit: int = CALIB_CHARS) -> str:
    """Docstrings (module, classes, functions; at least MIN_DOC_CHARS long) of STDLIB_MODULES, in order,
    at most limit / len(STDLIB_MODULES) characters from each module (a docstring too long for what is
    left is cut after a paragraph), separated by blank lines."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    per_module = limit // len(STDLIB_MODULES)
    parts: list[str] = []
    for name in STDLIB_MODULES:
        folder = stdlib / name
        path = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
        if not path.is_file():
            continue
        taken = 0
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # module first, then outward in
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc is None or len(doc) < MIN_DOC_CHARS:
                continue
            if len(doc) > per_module - taken:  # keep its first paragraphs, if they fit
                cut = doc.rfind("\n\n", 0, per_module - taken)
                if cut < MIN_DOC_CHARS:
                    continue  # a shorter one further on may still fit
                doc = doc[:cut]
            parts.append(doc)
            taken += len(doc)
    return "\n\n".join(parts) + "\n"


def site_packages_licenses() -> str:
    """The license texts in this Python's site-packages (`*.dist-info`, sorted by path), each non-blank
    line kept once, runs of blank lines collapsed."""
    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
    files = sorted(
        p for root in roots for info in root.glob("*.dist-info") for p in info.rglob("*")
        if p.is_file() and LICENSE_NAME.match(p.name)
    )
    seen: set[str] = set()
    out: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            line = line.rstrip()
            key = " ".join(line.split())
            if not key:
                if out and out[-1]:
                    out.append("")
                continue
            if key in seen:
                continue
            seen.add(key)
            out.append(line)
    return "\n".join(out).strip() + "\n"


@dataclass
class TextInfo:
    path: str
    source: str
    chars: int
    tokens: int
    sha256: str


def write_text(dest: Path, given: Path | None, make) -> Path:
    """`given` as it is, or the text `make()` returns written to `dest`."""
    if given is not None:
        if not given.is_file():
            sys.exit(f"{given} does not exist")
        return given.resolve()
    dest.write_text(make(), encoding="utf-8")
    return dest


@contextlib.contextmanager
def silent_stderr():
    """File descriptor 2 sent to /dev/null: llama.cpp logs a context warning even with verbose=False."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_tokens(model: Path, path: Path) -> int:
    """Tokens of the text file `path` by llama.cpp's tokenizer of `model` (no BOS), as the evaluator counts."""
    from llama_cpp import Llama

    with silent_stderr():
        llm = Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        return len(llm.tokenize(path.read_bytes(), add_bos=False, special=False))
    finally:
        llm.close()


def text_info(model: Path, path: Path, source: str) -> TextInfo:
    data = path.read_bytes()
    return TextInfo(str(path), source, len(data.decode("utf-8")), count_tokens(model, path),
                    hashlib.sha256(data).hexdigest())


# --- llama.cpp's tools ------------------------------------------------------------------------------

def configured_source(build_dir: Path) -> Path | None:
    """The source folder a CMake build folder was configured from, or None."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    match = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache.read_text(errors="replace"), re.MULTILINE)
    return Path(match.group(1)).resolve() if match else None


def build_commands(tree: Path, build_dir: Path, jobs: int) -> list[list[str]]:
    return [
        ["cmake", "-S", str(tree), "-B", str(build_dir), *CMAKE_FLAGS],
        ["cmake", "--build", str(build_dir), "--config", "Release", "--target", *BUILD_TARGETS, f"-j{jobs}"],
    ]


def ensure_llama_tools(tree: Path, build_dir: Path, jobs: int,
                       console: Console) -> tuple[dict[str, Path], float | None]:
    """llama.cpp's tools built from `tree` in `build_dir`: {target: binary}, and the build's wall time
    (None when they were already there). A build folder configured from another tree is removed."""
    binaries = {t: build_dir / "bin" / t for t in BUILD_TARGETS}
    source = configured_source(build_dir)
    if source == tree.resolve() and all(b.is_file() for b in binaries.values()):
        return binaries, None
    if source is not None and source != tree.resolve():
        console.print(f"{build_dir} was configured from {source}; rebuilding from {tree}")
        shutil.rmtree(build_dir)
    if shutil.which("cmake") is None:
        sys.exit("cmake is not installed: `pip install cmake` or your system's package, then rerun")
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "edgeai-build.log"
    console.print(f"building {', '.join(BUILD_TARGETS)} from {tree} in {build_dir} (once; log: {log})")
    start = time.perf_counter()
    with open(log, "w") as sink:
        for argv in build_commands(tree, build_dir, jobs):
            sink.write(f"$ {shlex.join(argv)}\n")
            sink.flush()
            if subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT).returncode != 0:
                sys.exit(f"building llama.cpp failed: {shlex.join(argv)}\n{log.read_text(errors='replace')[-3000:]}")
    wall = time.perf_counter() - start
    missing = [str(b) for b in binaries.values() if not b.is_file()]
    if missing:
        sys.exit(f"the llama.cpp build did not produce {', '.join(missing)}; see {log}")
    console.print(f"built llama.cpp's tools in {wall:.0f} s")
    return binaries, wall


# --- runs -------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One quantized file: how it was made and what the evaluator said."""

    tool: str  # "edgeai" | "llama.cpp"
    type: str  # llama-quantize type or edgeai recipe
    method: str  # edgeai: rtn | imatrix | ...; llama.cpp: imatrix | none
    path: str
    command: str
    quant_s: float | None = None  # wall time of the quantizing command
    calib_s: float | None = None  # wall time of a calibration run shared with other rows (llama-imatrix)
    size_bytes: int | None = None
    bpw: float | None = None
    ppl: float | None = None
    ref_ppl: float | None = None
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    n_tokens: int | None = None
    eval_command: str = ""
    error: str = ""
    target_bpw: float | None = None
    fair: bool = True  # no Q4_1/Q5_1 (see FAIR_TYPES)

    @property
    def label(self) -> str:
        return f"{self.tool} {self.type} {self.method}"


@dataclass
class Bench:
    """Where things go and how to run the children."""

    work: Path
    env: dict[str, str]
    threads: int
    console: Console
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, argv: list[str], log_name: str) -> tuple[float, str]:
        """Run `argv` with its output in logs/`log_name`; (wall seconds, error message or "")."""
        log = self.logs / log_name
        self.console.print(f"$ {shlex.join(argv)}", highlight=False, markup=False, soft_wrap=True)
        with open(log, "w") as sink:
            start = time.perf_counter()
            done = subprocess.run(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - start
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            message = f"exit {done.returncode} (log {log}):\n  " + "\n  ".join(tail)
            self.console.print(f"[red]failed[/red] {message}", highlight=False)
            return wall, message
        return wall, ""


def edgeai_cli() -> Path:
    cli = Path(sys.executable).parent / "edgeai"
    if not cli.is_file():
        sys.exit(f"{cli} does not exist; run this script with the Python of edgeai's virtualenv")
    return cli


def edgeai_has_option(cli: Path, option: str) -> bool:
    """Whether `edgeai convert --help` lists `option` (e.g. --target-bpw)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run([str(cli), "convert", "--help"], env=env, capture_output=True, text=True)
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", done.stdout + done.stderr) is not None


def quantize_llama_cpp(bench: Bench, tools: dict[str, Path], ref: Path, imatrix: Path | None,
                       qtype: str, use_imatrix: bool, imatrix_s: float | None) -> Row:
    method = "imatrix" if use_imatrix else "none"
    out = bench.work / f"llamacpp-{qtype}{'-imatrix' if use_imatrix else ''}.gguf"
    argv = [str(tools["llama-quantize"])]
    if use_imatrix:
        argv += ["--imatrix", str(imatrix)]
    argv += [str(ref), str(out), qtype, str(bench.threads)]
    row = Row("llama.cpp", qtype, method, str(out), shlex.join(argv))
    if use_imatrix and imatrix is None:
        row.error = "no importance matrix (llama-imatrix failed)"
        return row
    out.unlink(missing_ok=True)
    row.quant_s, row.error = bench.run(argv, out.with_suffix(".log").name)
    row.calib_s = imatrix_s if use_imatrix else None
    return row


def quantize_edgeai(bench: Bench, cli: Path, checkpoint: Path, calib: Path, recipe: str | None, method: str,
                    target_bpw: float | None = None, fair: bool = True) -> Row:
    if target_bpw is None:
        name, shown = f"edgeai-{recipe}-{method}.gguf", recipe
        quant = ["--quant", recipe]
        fair = recipe not in ("q4_1", "q5_1")
    else:
        types = "fair" if fair else "all"
        name, shown = f"edgeai-bpw{target_bpw:.4f}-{types}-{method}.gguf", f"bpw {target_bpw:.4f} {types} types"
        quant = ["--target-bpw", f"{target_bpw:.4f}"] + (["--target-types", ",".join(FAIR_TYPES)] if fair else [])
    out = bench.work / name
    argv = [str(cli), "convert", str(checkpoint), "-o", str(out), *quant, "--method", method]
    if method not in RTN_METHODS:
        argv += ["--calib", str(calib), "--calib-ctx", str(CALIB_CTX)]
    argv += ["--threads", str(bench.threads), "--force", "--quiet"]
    row = Row("edgeai", shown, method, str(out), shlex.join(argv), target_bpw=target_bpw, fair=fair)
    row.quant_s, row.error = bench.run(argv, Path(name).with_suffix(".log").name)
    return row


def evaluate(bench: Bench, cli: Path, row: Row, ref: Path, text: Path, ctx: int, chunks: int | None) -> None:
    """Fill `row` with what `edgeai eval --json` says about its file."""
    argv = [str(cli), "eval", row.path, "--reference", str(ref), "--text", str(text), "--ctx", str(ctx),
            "--threads", str(bench.threads), "--json"]
    if chunks is not None:
        argv += ["--chunks", str(chunks)]
    row.eval_command = shlex.join(argv)
    log = bench.logs / (Path(row.path).stem + ".eval.log")
    bench.console.print(f"$ {row.eval_command}", highlight=False, markup=False, soft_wrap=True)
    start = time.perf_counter()
    done = subprocess.run(argv, env=bench.env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    log.write_text(done.stderr + done.stdout)
    if done.returncode != 0:
        row.error = f"edgeai eval: exit {done.returncode} (log {log}): {done.stderr.strip()[-500:]}"
        bench.console.print(f"[red]failed[/red] {row.error}", highlight=False)
        return
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("size_bytes", "bpw", "ppl", "ref_ppl", "kld_mean", "kld_median", "kld_p99", "top1", "n_tokens"):
        setattr(row, key, result[key])
    bench.console.print(
        f"  {row.label}: PPL {row.ppl:.4f}, KLD {row.kld_mean:.5f}, top-1 {100 * row.top1:.2f} % "
        f"({time.perf_counter() - start:.0f} s)", highlight=False,
    )


def reference_perplexity(bench: Bench, tools: dict[str, Path], ref: Path, text: Path, ctx: int,
                         chunks: int | None) -> tuple[float | None, str]:
    """llama-perplexity's PPL of the reference on the evaluation text (F32 KV cache, as the evaluator)."""
    argv = [str(tools["llama-perplexity"]), "-m", str(ref), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
            "-t", str(bench.threads), "-ctk", "f32", "-ctv", "f32"]
    if chunks is not None:
        argv += ["--chunks", str(chunks)]
    _, error = bench.run(argv, "llama-perplexity-ref.log")
    if error:
        return None, shlex.join(argv)
    output = (bench.logs / "llama-perplexity-ref.log").read_text(errors="replace")
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    return (float(match.group(1)) if match else None), shlex.join(argv)


def closest(rows: list[Row], fair_only: bool = False) -> list[dict]:
    """For each llama.cpp imatrix row, the edgeai row closest in size (ties within 0.5 %: the lower KLD);
    with `fair_only`, among edgeai's rows that use no Q4_1/Q5_1."""
    ours = [r for r in rows if r.tool == "edgeai" and r.kld_mean is not None and (r.fair or not fair_only)]
    pairs = []
    for theirs in rows:
        if theirs.tool != "llama.cpp" or theirs.method != "imatrix" or theirs.kld_mean is None or not ours:
            continue
        best_gap = min(abs(r.size_bytes - theirs.size_bytes) for r in ours)
        near = [r for r in ours if abs(r.size_bytes - theirs.size_bytes) <= best_gap + 0.005 * theirs.size_bytes]
        mine = min(near, key=lambda r: r.kld_mean)
        pairs.append({
            "llama.cpp": theirs.label, "edgeai": mine.label,
            "llama.cpp_mib": theirs.size_bytes / MIB, "edgeai_mib": mine.size_bytes / MIB,
            "llama.cpp_kld": theirs.kld_mean, "edgeai_kld": mine.kld_mean,
            "kld_ratio": mine.kld_mean / theirs.kld_mean if theirs.kld_mean > 0 else float("nan"),
            "fair_only": fair_only,
        })
    return pairs


# --- report -----------------------------------------------------------------------------------------

def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_report(report: dict) -> None:
    console = Console()
    if not console.is_terminal:  # a file or a pipe: do not squeeze the table into 80 columns
        console.width = 160
    rows = [Row(**r) for r in report["rows"]]
    ref = report["reference"]
    setup = report["setup"]
    chunks = setup["eval_chunks"]
    title = (f"{Path(setup['checkpoint']).name}: quantized against {Path(ref['path']).name}, "
             f"eval on {setup['eval_tokens_scored']:,} tokens ({chunks} chunks of {setup['ctx']})")
    table = Table(title=title)
    for name, justify in (("tool", "left"), ("type / recipe", "left"), ("method", "left"), ("size MiB", "right"),
                          ("bpw", "right"), ("quant s", "right"), ("PPL", "right"), ("KLD mean", "right"),
                          ("KLD p99", "right"), ("top-1 %", "right")):
        table.add_column(name, justify=justify)
    table.add_row("reference", "F16", "-", fmt(ref["size_bytes"], ".1f", 1 / MIB), fmt(ref["bpw"], ".2f"),
                  fmt(ref["convert_s"], ".1f"), fmt(ref["ppl"], ".4f"), "0", "0", "100", end_section=True)
    for r in sorted(rows, key=lambda r: (-(r.size_bytes or 0), r.tool, r.method)):
        seconds = fmt(r.quant_s, ".1f") + (f" + {r.calib_s:.0f}" if r.calib_s is not None else "")
        if r.error:
            table.add_row(r.tool, r.type, r.method, "-", "-", seconds, "[red]failed[/red]", "-", "-", "-")
            continue
        table.add_row(r.tool, r.type, r.method, fmt(r.size_bytes, ".1f", 1 / MIB), fmt(r.bpw, ".2f"), seconds,
                      fmt(r.ppl, ".4f"), fmt(r.kld_mean, ".5f"), fmt(r.kld_p99, ".4f"), fmt(r.top1, ".2f", 100))
    console.print(table)

    for pair in report["closest"]:
        console.print(
            f"{'[fair types] ' if pair.get('fair_only') else '[any type]   '}{pair['llama.cpp']} ({pair['llama.cpp_mib']:.1f} MiB, KLD {pair['llama.cpp_kld']:.5f})  ~  "
            f"{pair['edgeai']} ({pair['edgeai_mib']:.1f} MiB, KLD {pair['edgeai_kld']:.5f}):  "
            f"KLD ours/theirs = {pair['kld_ratio']:.3f}", highlight=False, markup=False,
        )
    calib, text = setup["calib"], setup["text"]
    notes = [
        f"calibration: {calib['path']} ({calib['source']}), {calib['tokens']:,} tokens, sha256 {calib['sha256'][:12]}; "
        f"both tools use {setup['calib_chunks']} chunks of {setup['calib_ctx']}",
        f"evaluation: {text['path']} ({text['source']}), {text['tokens']:,} tokens, sha256 {text['sha256'][:12]}",
        f"quant s: wall time of the quantizing command (reference: its conversion to F16); '+ N': llama-imatrix's "
        f"{setup['imatrix_s'] or 0:.0f} s, run once for those rows; edgeai's calibrated rows include their "
        f"calibration. {setup['threads']} thread(s) for every tool.",
        f"llama-perplexity on the reference: PPL {fmt(setup['llama_perplexity_ref'], '.4f')} "
        f"(edgeai eval: {fmt(ref['ppl'], '.4f')})",
        f"llama.cpp tools: {setup['llama_cpp_build']}",
        "; ".join(f"{k} {v}" for k, v in setup["versions"].items()),
    ]
    if setup.get("target_bpw_note"):
        notes.append(setup["target_bpw_note"])
    for note in notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    console.print("commands:", highlight=False)
    for command in report["commands"]:
        console.print(f"  {command}", highlight=False, markup=False, soft_wrap=True)
    failed = [r for r in rows if r.error]
    if failed:
        console.print(f"[red]{len(failed)} failed:[/red]")
        for r in failed:
            console.print(f"  {r.label}: {r.error}", highlight=False, markup=False, soft_wrap=True)


# --- main -------------------------------------------------------------------------------------------

def parse_edgeai(value: str) -> tuple[str, str]:
    recipe, sep, method = value.partition(":")
    if not sep or not recipe or not method:
        raise argparse.ArgumentTypeError(f"{value!r}: expected RECIPE:METHOD, e.g. q4_k_m:imatrix")
    return recipe.lower(), method.lower()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="Hugging Face folder (default: SmolLM2-135M-Instruct, float32)")
    parser.add_argument("--llama-cpp-src", type=Path,
                        help="extracted llama-cpp-python source distribution (default: the installed version's)")
    parser.add_argument("--build-dir", type=Path, default=BUILD_DIR,
                        help=f"llama.cpp build folder (default: {BUILD_DIR})")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help=f"files, texts and logs (default: {WORK_DIR})")
    parser.add_argument("--calib", type=Path, help="calibration text (default: standard-library docstrings)")
    parser.add_argument("--text", type=Path, help="evaluation text (default: site-packages license texts)")
    parser.add_argument("--ctx", type=int, default=512, help="evaluation tokens per chunk (default: 512)")
    parser.add_argument("--chunks", type=int, help="evaluate only the first N chunks (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for every tool (default: every core)")
    parser.add_argument("--edgeai", type=parse_edgeai, action="append", metavar="RECIPE:METHOD",
                        help="an edgeai configuration; repeat it; replaces EDGEAI_CONFIGS")
    parser.add_argument("--edgeai-source", choices=("reference", "checkpoint"), default="reference",
                        help="what edgeai quantizes: the F16 reference llama.cpp quantizes too (default: same input, "
                             "same target), or the float32 checkpoint")
    parser.add_argument("--no-llama-cpp", action="store_true",
                        help="reuse llama.cpp's files and imatrix of an earlier run in --work instead of making them")
    parser.add_argument("--no-recipes", dest="edgeai", action="store_const", const=[],
                        help="no edgeai recipe runs (only TARGET_BPW ones)")
    parser.add_argument("--target-method", action="append", metavar="METHOD",
                        help="only the TARGET_BPW runs of this method; repeat it (default: the --edgeai methods, or all)")
    parser.add_argument("--keep-edgeai", action="store_true",
                        help="with --no-llama-cpp: keep the evaluated edgeai rows of the earlier run too")
    parser.add_argument("--targets", choices=("all", "fair", "none"), default="all",
                        help="which TARGET_BPW runs: all, only those among FAIR_TYPES, or none")
    parser.add_argument("--no-ppl-check", action="store_true", help="skip llama-perplexity on the reference")
    parser.add_argument("--show", type=Path, metavar="REPORT_JSON",
                        help="only print a saved report (WORK/report.json of an earlier run) and exit")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (rows, pairs, setup, commands) instead of tables")
    args = parser.parse_args(argv)
    if args.chunks is not None and args.chunks < 1:
        parser.error("--chunks must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show is not None:
        report = json.loads(args.show.read_text())
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_report(report)
        return 0
    console = Console(stderr=True)  # progress; stdout holds only the report
    cli = edgeai_cli()
    checkpoint = (args.checkpoint or base.default_checkpoint(console)).resolve()
    if not (checkpoint / "config.json").is_file():
        sys.exit(f"{checkpoint} is not a Hugging Face checkpoint folder (no config.json)")
    sdist = (args.llama_cpp_src or base.fetch_llama_cpp_src(console)).resolve()
    tree = sdist / base.LLAMA_CPP
    if not (tree / "CMakeLists.txt").is_file():
        sys.exit(f"{tree} has no CMakeLists.txt; --llama-cpp-src must be an extracted llama-cpp-python sdist")
    build_dir = args.build_dir.resolve()
    tools, build_s = ensure_llama_tools(tree, build_dir, os.cpu_count() or 1, console)
    built = f"built now in {build_s:.0f} s" if build_s is not None else "already built"
    build_note = f"{built} in {build_dir} from {tree}"

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in base.THREAD_VARS}
    bench = Bench(work, env, args.threads, console)
    commands = [shlex.join(c) for c in build_commands(tree, build_dir, os.cpu_count() or 1)]

    # reference and texts
    ref = work / "ref-f16.gguf"
    ref_argv = [str(cli), "convert", str(checkpoint), "-o", str(ref), "--outtype", "f16", "--force", "--quiet"]
    if args.no_llama_cpp and ref.is_file():  # llama.cpp's files were made from this one: keep it
        convert_s = json.loads((work / "report.json").read_text())["reference"]["convert_s"]
    else:
        convert_s, error = bench.run(ref_argv, "ref-f16.log")
        if error:
            sys.exit(f"converting the reference failed: {error}")
    commands.append(shlex.join(ref_argv))
    calib = write_text(work / "calib.txt", args.calib, stdlib_docstrings)
    text = write_text(work / "eval.txt", args.text, site_packages_licenses)
    calib_info = text_info(ref, calib, "given" if args.calib else "standard-library docstrings")
    eval_info = text_info(ref, text, "given" if args.text else "site-packages license texts, lines deduplicated")
    try:
        from edgeai.quant.calibrate import DEFAULT_MAX_TOKENS
    except ImportError:
        DEFAULT_MAX_TOKENS = 32 * 1024
    calib_chunks = min(calib_info.tokens // CALIB_CTX, DEFAULT_MAX_TOKENS // CALIB_CTX)
    text_chunks = eval_info.tokens // args.ctx
    eval_chunks = text_chunks if args.chunks is None else min(args.chunks, text_chunks)
    if calib_info.tokens < 2 * CALIB_CTX or eval_chunks < 1:  # llama-imatrix wants two chunks' worth of text
        sys.exit(f"the texts are too short: calibration {calib_info.tokens} tokens (at least {2 * CALIB_CTX}), "
                 f"evaluation {eval_info.tokens} tokens (at least {args.ctx})")
    console.print(f"calibration text {calib}: {calib_info.tokens:,} tokens -> {calib_chunks} chunks of {CALIB_CTX}\n"
                  f"evaluation text {text}: {eval_info.tokens:,} tokens -> {eval_chunks} of {text_chunks} chunks "
                  f"of {args.ctx}", highlight=False)

    # llama.cpp
    imatrix_file = work / "imatrix.gguf"
    imatrix_argv = [str(tools["llama-imatrix"]), "-m", str(ref), "-f", str(calib), "-o", str(imatrix_file),
                    "-c", str(CALIB_CTX), "--chunks", str(calib_chunks), "-t", str(args.threads)]
    rows: list[Row] = []
    commands.append(shlex.join(imatrix_argv))
    if args.no_llama_cpp:  # the files and times of the earlier run (they are evaluated again below)
        earlier = json.loads((work / "report.json").read_text())
        imatrix_s = earlier["setup"]["imatrix_s"]
        same_eval = (earlier["setup"]["text"]["sha256"] == eval_info.sha256
                     and earlier["setup"]["eval_chunks"] == eval_chunks and earlier["setup"]["ctx"] == args.ctx)
        for r in earlier["rows"]:
            if args.keep_edgeai and r["tool"] == "edgeai" and r.get("kld_mean") is not None and same_eval:
                rows.append(Row(**r))  # edgeai files of the earlier run, already evaluated
            if r["tool"] == "llama.cpp" and (r["type"], r["method"] == "imatrix") in LLAMA_CPP_CONFIGS:
                # same file, same text, same chunks: the evaluator would print the same numbers
                rows.append(Row(**r) if same_eval else Row(**{k: r[k] for k in (
                    "tool", "type", "method", "path", "command", "quant_s", "calib_s")}))
    else:
        imatrix_file.unlink(missing_ok=True)
        imatrix_s, error = bench.run(imatrix_argv, "llama-imatrix.log")
        imatrix = None if error or not imatrix_file.is_file() else imatrix_file
        for qtype, use_imatrix in LLAMA_CPP_CONFIGS:
            rows.append(quantize_llama_cpp(bench, tools, ref, imatrix, qtype, use_imatrix, imatrix_s))

    from edgeai.evaluate import gguf_size

    ref_size, ref_bpw = gguf_size(ref)
    target_note = ""
    ppl_ref = None
    source = ref if args.edgeai_source == "reference" else checkpoint

    def write_report() -> dict:
        """report.json of the rows so far (written after each row: a long run can be read while it goes)."""
        listed = list(commands)
        for row in rows:
            listed += [c for c in (row.command, row.eval_command) if c]
        report = {
            "rows": [asdict(r) for r in rows],
            "closest": closest(rows, fair_only=True) + closest(rows),
            "reference": {"path": str(ref), "size_bytes": ref_size, "bpw": ref_bpw,
                          "ppl": next((r.ref_ppl for r in rows if r.ref_ppl is not None), None), "convert_s": convert_s},
            "setup": {
                "checkpoint": str(checkpoint), "edgeai_source": str(source), "threads": args.threads, "ctx": args.ctx,
                "eval_chunks": eval_chunks, "eval_tokens_scored": eval_chunks * (args.ctx - args.ctx // 2 - 1),
                "calib_ctx": CALIB_CTX, "calib_chunks": calib_chunks,
                "calib": asdict(calib_info), "text": asdict(eval_info),
                "imatrix_s": imatrix_s, "llama_perplexity_ref": ppl_ref,
                "llama_cpp_build": build_note, "llama_cpp_build_s": build_s,
                "target_bpw_note": target_note,
                "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "versions": base.versions(sdist),
            },
            "commands": listed,
        }
        (work / "report.json").write_text(json.dumps(report, indent=2))
        return report

    for row in rows:  # llama.cpp's (rows reused by --no-llama-cpp may be evaluated already)
        if not row.error and row.kld_mean is None:
            evaluate(bench, cli, row, ref, text, args.ctx, args.chunks)
    write_report()

    # edgeai, each file evaluated as soon as it is written
    recipes = [] if args.edgeai == [] else args.edgeai or EDGEAI_CONFIGS
    jobs: list[tuple[str | None, str, float | None, bool]] = [(r, m, None, True) for r, m in recipes]
    if edgeai_has_option(cli, "--target-bpw"):
        for (qtype, use_imatrix), method, fair in TARGET_BPW:
            if args.target_method is not None and method not in args.target_method:
                continue
            if args.target_method is None and args.edgeai and method not in {m for _, m in args.edgeai}:
                continue  # --edgeai given: only the methods it names
            if args.targets == "none" or (args.targets == "fair" and not fair):
                continue
            theirs = next((r for r in rows if r.tool == "llama.cpp" and r.type == qtype
                           and (r.method == "imatrix") == use_imatrix and not r.error), None)
            if theirs is not None:
                jobs.append((None, method, gguf_size(Path(theirs.path))[1], fair))
    else:
        target_note = "edgeai convert has no --target-bpw yet: no runs at llama.cpp's exact bpw"
    for recipe, method, bpw, fair in jobs:
        row = quantize_edgeai(bench, cli, source, calib, recipe, method, bpw, fair)
        rows.append(row)
        if not row.error:
            evaluate(bench, cli, row, ref, text, args.ctx, args.chunks)
        write_report()

    if not args.no_ppl_check:
        ppl_ref, ppl_command = reference_perplexity(bench, tools, ref, text, args.ctx, args.chunks)
        commands.append(ppl_command)
    report = write_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
