"""Long fuzzing runs, by hand (the test suite only replays the committed corpora).

    .venv/bin/python benchmarks/fuzz.py run [--harness NAME ...] [--runs N] [--max-time SECONDS]
    .venv/bin/python benchmarks/fuzz.py seeds      # rewrite the seed-* files of every corpus

Harnesses (each starts from its committed corpus; see native/fuzz and tests/fuzz/harnesses.py):

    gguf, model                           C++ (native/fuzz): libFuzzer + AddressSanitizer + UBSan, built
                                          with clang by native/CMakeLists.txt (EDGEAI_LIBFUZZER)
    safetensors, gguf_metadata, onnx_config  Python: atheris (libFuzzer's engine, Python coverage)

clang comes from Debian (`apt-get install -y clang`), atheris from the test extras. Each harness runs
as one process on one core. The working corpus, the build and any crashing input go to
~/.cache/edgeai-bench/fuzz (--work); a crashing input is copied next to the committed corpus as
crash-NAME only when it is fixed and a regression test names it (by hand). Prints, per harness:
executions, libFuzzer's coverage figures (cov: edges or Python branches, ft: features), new corpus
inputs, crashes and wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fuzz"))
sys.path.insert(0, str(REPO / "tests"))
NATIVE_HARNESSES = ("gguf", "model")
PYTHON_HARNESSES = ("safetensors", "gguf_metadata", "onnx_config")
SAN_ENV = {"ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}


def build_native(work: Path) -> Path:
    """fuzz_gguf and fuzz_model with libFuzzer, ASan and UBSan (clang; the best kernel set of this CPU)."""
    from edgeai import _native

    clang = shutil.which("clang++")
    if clang is None:
        sys.exit("clang++ is missing: apt-get install -y clang")
    cmake = str(Path(sys.executable).parent / "cmake") if (Path(sys.executable).parent / "cmake").exists() else "cmake"
    best = _native.kernel_best()
    out = work / "build"
    flags = ["-DEDGEAI_PYTHON_MODULE=OFF", "-DEDGEAI_SANITIZE=ON", "-DEDGEAI_FUZZ=ON", "-DEDGEAI_LIBFUZZER=ON",
             f"-DCMAKE_CXX_COMPILER={clang}", "-DCMAKE_BUILD_TYPE=",
             f"-DEDGEAI_KERNEL_SETS={'' if best == 'scalar' else best.replace('-', '_')}"]
    subprocess.run([cmake, "-S", str(REPO / "native"), "-B", str(out), *flags], check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(out), "--target", "fuzz_gguf", "fuzz_model", "-j", "2"], check=True)
    return out


FINAL = re.compile(r"#(\d+)\s+(?:DONE|INITED|NEW|REDUCE|pulse)\s+(?:cov: (\d+) )?ft: (\d+)")


def run_one(name: str, work: Path, build: Path | None, runs: int, max_time: int) -> dict:
    """One harness for `runs` executions (or `max_time` seconds); its figures."""
    from seeds import CORPORA

    corpus = work / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    crashes = work / "crashes" / name
    crashes.mkdir(parents=True, exist_ok=True)
    before = len(list(corpus.iterdir()))
    args = [f"-runs={runs}", f"-max_total_time={max_time}", "-print_final_stats=1", f"-artifact_prefix={crashes}/",
            "-max_len=65536", "-timeout=20", "-rss_limit_mb=4096", str(corpus), str(CORPORA[name])]
    if name in NATIVE_HARNESSES:
        cmd = [str(build / f"fuzz_{name}"), *args]
    else:
        cmd = [sys.executable, __file__, "_atheris", name, *args]
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **SAN_ENV})
    wall = time.monotonic() - start
    log = run.stderr
    (work / f"{name}.log").write_text(log)
    figures = FINAL.findall(log)
    execs = re.search(r"stat::number_of_executed_units: (\d+)", log)
    last = figures[-1] if figures else ("0", "", "0")
    return {"harness": name, "execs": int(execs.group(1)) if execs else int(last[0]), "cov": last[1] or "-",
            "ft": last[2], "new_inputs": len(list(corpus.iterdir())) - before,
            # libFuzzer's artifacts: crash-, leak-, timeout-, oom- (failures); slow-unit- (a note, not one)
            "crashes": sum(not f.name.startswith("slow-unit-") for f in crashes.iterdir()),
            "exit": run.returncode, "wall_s": round(wall, 1), "command": " ".join(cmd)}


def atheris_main(name: str, args: list[str]) -> None:
    """The child process of a Python harness: atheris over harnesses.HARNESSES[name], with the
    edgeai package instrumented for coverage."""
    import logging

    import atheris

    # warnings (a chat template that does not compile) are what fuzzed input gives; not in the suite,
    # whose tests check them
    logging.getLogger("edgeai").setLevel(logging.ERROR)

    with atheris.instrument_imports(include=["edgeai"]):
        import harnesses

        # import what the harness reaches now, inside the instrumentation
        import edgeai.converters.convert  # noqa: F401
        import edgeai.converters.sources  # noqa: F401
        import edgeai.model  # noqa: F401
        import edgeai.runtimes.native  # noqa: F401
        import edgeai.runtimes.onnxrt  # noqa: F401
        import edgeai.runtimes.vocab  # noqa: F401
    atheris.Setup([sys.argv[0], *args], harnesses.HARNESSES[name])
    atheris.Fuzz()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_atheris":
        atheris_main(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="fuzz each harness for a number of executions")
    run.add_argument("--harness", nargs="+", choices=NATIVE_HARNESSES + PYTHON_HARNESSES,
                     default=list(NATIVE_HARNESSES + PYTHON_HARNESSES))
    run.add_argument("--runs", type=int, default=1_000_000, help="executions per harness")
    run.add_argument("--max-time", type=int, default=1800, help="seconds per harness at most")
    run.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgeai-bench" / "fuzz")
    sub.add_parser("seeds", help="rewrite the seed-* files of every committed corpus")
    opts = parser.parse_args()
    if opts.cmd == "seeds":
        from seeds import write_seeds

        for name, files in write_seeds().items():
            print(f"{name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")
        return
    opts.work.mkdir(parents=True, exist_ok=True)
    build = build_native(opts.work) if set(opts.harness) & set(NATIVE_HARNESSES) else None
    print(f"{'harness':<14} {'execs':>10} {'cov':>6} {'ft':>7} {'new':>5} {'crashes':>7} {'wall s':>7}")
    for name in opts.harness:
        r = run_one(name, opts.work, build, opts.runs, opts.max_time)
        print(f"{r['harness']:<14} {r['execs']:>10} {r['cov']:>6} {r['ft']:>7} {r['new_inputs']:>5} {r['crashes']:>7} "
              f"{r['wall_s']:>7}", flush=True)
        print(f"  {r['command']}  (exit {r['exit']}; log {opts.work / (name + '.log')})", flush=True)


if __name__ == "__main__":
    main()
