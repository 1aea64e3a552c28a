"""The native code under AddressSanitizer and UndefinedBehaviorSanitizer: native/CMakeLists.txt
with EDGEAI_SANITIZE (gcc, -O1 -g, any report fatal) and EDGEAI_FUZZ builds the GGUF reader and the
engine without Python: the fuzz harnesses (native/fuzz, each with the replay main()) and
native/tests/engine_logits.cpp. The harnesses replay their committed corpora (the writers' seeds and
every input a fuzzer once failed on); the engine runs tiny converted models with both KV caches and
must give the installed engine's logits.

Only the scalar kernels and the one set this CPU picks are built, and the build is kept in
tests/.cache/sanitize-HASH (HASH: the native sources and the build flags), so a rerun with unchanged
sources builds nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

NATIVE = Path(__file__).resolve().parents[2] / "native"
CACHE = Path(__file__).resolve().parents[1] / ".cache"
# cmake from the test extras (PyPI), else the system's
CMAKE = str(Path(sys.executable).parent / "cmake") if (Path(sys.executable).parent / "cmake").exists() else shutil.which("cmake")
CXX = shutil.which("g++")
# halt_on_error: the first report ends the run; detect_leaks: the engine frees what it allocates
SAN_ENV = {"ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1:abort_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}

pytestmark = pytest.mark.skipif(CXX is None or CMAKE is None, reason="g++ or cmake is missing (Debian: g++; cmake: the test extras)")


def _cmake_set(isa: str) -> str:
    """native/CMakeLists.txt's kernel_set name of a kernel set as the engine names it (avx512-vnni ->
    avx512_vnni); "" for the scalar set, which every build has."""
    return "" if isa == "scalar" else isa.replace("-", "_")


@pytest.fixture(scope="module")
def sanitized() -> Path:
    """The build folder of the sanitized harnesses and engine_logits (built once per source hash)."""
    from edgeai import _native

    kernel_set = _cmake_set(_native.kernel_best())
    flags = ["-DEDGEAI_PYTHON_MODULE=OFF", "-DEDGEAI_SANITIZE=ON", "-DEDGEAI_FUZZ=ON", f"-DEDGEAI_KERNEL_SETS={kernel_set}",
             f"-DCMAKE_CXX_COMPILER={CXX}", "-DCMAKE_BUILD_TYPE="]
    digest = hashlib.sha256("\0".join(flags).encode())
    for f in sorted(p for d in ("src", "fuzz", "tests") for p in (NATIVE / d).glob("*.[ch]pp")) + [NATIVE / "CMakeLists.txt"]:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    out = CACHE / f"sanitize-{digest.hexdigest()[:16]}"
    if not (out / "built").exists():
        for old in CACHE.glob("sanitize-*"):  # builds of older sources
            shutil.rmtree(old, ignore_errors=True)
        for cmd in ([CMAKE, "-S", str(NATIVE), "-B", str(out), *flags],
                    [CMAKE, "--build", str(out), "--target", "fuzz_gguf", "fuzz_model", "engine_logits", "-j", "2"]):
            run = subprocess.run(cmd, capture_output=True, text=True)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        (out / "built").touch()
    return out


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **SAN_ENV})


@pytest.mark.parametrize("harness", ["gguf", "model"])
def test_fuzz_corpus_replays_clean_under_sanitizers(sanitized, harness):
    """Every seed and every input a fuzzer once failed on (native/fuzz/corpus/NAME) runs through its
    harness with no crash, no sanitizer report and no broken invariant."""
    corpus = NATIVE / "fuzz" / "corpus" / harness
    files = sorted(corpus.iterdir())
    assert any(f.name.startswith("seed-") for f in files)
    run = _run([str(sanitized / f"fuzz_{harness}"), str(corpus)])
    assert run.returncode == 0, run.stdout + run.stderr[-6000:]
    assert f"replayed {len(files)} inputs" in run.stdout
    assert "runtime error" not in run.stderr and "Sanitizer" not in run.stderr, run.stderr[-6000:]


@pytest.mark.parametrize("model, kv", [
    ("f32", "f16"),
    ("q4_0", "f16"),
    ("seed-llama-q8_0", "q8_0"),  # the fuzz seeds: head_dim 32, which a q8_0 cache needs (the tiny model's is 16)
    ("seed-qwen3moe-q8_0", "q8_0"),
    ("seed-llama-q8_0", "q8_0/q4_0"),  # 4-bit values, and keys and values of two types
    ("seed-qwen3moe-q8_0", "q4_0"),
])
def test_engine_runs_clean_under_sanitizers_and_matches_the_installed_engine(sanitized, tiny_chat_gguf, tmp_path,
                                                                            model, kv):
    """Tiny models (float, Q4_0 and Q8_0 weights, dense and MoE; f16, q8_0, q4_0 and mixed caches; 2 threads)
    through the sanitized engine: no report, and the installed engine's logits."""
    import edgeai
    from edgeai.gguf_header import read_header
    from edgeai.runtimes.native import NativeBackend, engine_config

    if model.startswith("seed-"):
        gguf = NATIVE / "fuzz" / "corpus" / "model" / model
    elif model == "f32":
        gguf = tiny_chat_gguf
    else:
        gguf = edgeai.convert(tiny_chat_gguf, tmp_path / f"{model}.gguf", quant=model)
    config = engine_config(read_header(gguf))
    (tmp_path / "config.txt").write_text("".join(f"{k} {float(v)}\n" for k, v in config.items()))
    # more than one 64-token batch
    tokens = np.random.default_rng(1).integers(0, config["n_vocab"], 70).astype("<i4")
    tokens.tofile(tmp_path / "tokens.bin")
    run = _run([str(sanitized / "engine_logits"), str(gguf), str(tmp_path / "config.txt"), str(tmp_path / "tokens.bin"),
                str(tmp_path / "logits.bin"), "2", kv])
    assert run.returncode == 0, run.stdout + run.stderr[-6000:]
    theirs = np.fromfile(tmp_path / "logits.bin", dtype="<f4").reshape(len(tokens), -1)
    backend = NativeBackend(gguf, n_ctx=128, threads=2, kv_cache=kv)
    ours = backend.eval_logits([int(t) for t in tokens])
    backend.close()
    # -O1 against -O3 of the same kernel set: the same operations in the same order
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
