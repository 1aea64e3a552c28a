"""The AArch64 build: native/CMakeLists.txt cross-configured for AArch64 with Debian's
g++-aarch64-linux-gnu (the project's own build description, so its kernel sets and flags are the
ones tested), its runtime library linked into the kernel self-test, run under qemu-aarch64 against
the numpy reference cases, and into the whole engine (native/tests/engine_logits.cpp), run there on
tiny models against this machine's engine. `make test` installs both packages (Makefile:
aarch64-tools); cmake comes with the test extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeai.converters.convert import convert
from edgeai.gguf_header import read_header
from edgeai.runtimes.native import NativeBackend, engine_config
from helpers import TINY_ARCHS, kld, make_tiny_checkpoint
from kernel_cases import make_cases, write_cases

NATIVE = Path(__file__).resolve().parents[2] / "native"
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
# cmake from the test extras (PyPI), else the system's
CMAKE = str(Path(sys.executable).parent / "cmake") if (Path(sys.executable).parent / "cmake").exists() else shutil.which("cmake")

pytestmark = pytest.mark.skipif(
    shutil.which(CXX) is None or shutil.which(QEMU) is None or CMAKE is None,
    reason=f"{CXX}, {QEMU} or cmake is missing (Debian: g++-aarch64-linux-gnu qemu-user, which `make test` installs "
           "as root; cmake: the test extras)",
)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> list[str]:
    """The engine's static libraries (runtime with every NEON kernel set, core) built for AArch64 by
    native/CMakeLists.txt."""
    out = tmp_path_factory.mktemp("aarch64-build")
    configure = [CMAKE, "-S", str(NATIVE), "-B", str(out), "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                 f"-DCMAKE_CXX_COMPILER={shutil.which(CXX)}", "-DEDGEAI_PYTHON_MODULE=OFF",
                 "-DCMAKE_BUILD_TYPE=Release"]
    for cmd in (configure, [CMAKE, "--build", str(out), "--target", "edgeai_runtime", "-j", "2"]):
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [str(out / "libedgeai_runtime.a"), str(out / "libedgeai_core.a")]


def link(runtime: list[str], out: Path, main: str) -> Path:
    """native/tests/MAIN linked with the AArch64 libraries into a static program."""
    binary = out / Path(main).stem
    subprocess.run([CXX, "-std=c++17", "-O2", f"-I{NATIVE / 'src'}", f"-I{NATIVE / 'tests'}", "-static", "-pthread",
                    str(NATIVE / "tests" / main), *runtime, "-o", str(binary)], check=True, capture_output=True, text=True)
    return binary


@pytest.fixture(scope="module")
def selftest(runtime, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("aarch64")
    cases = out / "cases.bin"
    write_cases(make_cases(), cases)
    return link(runtime, out, "kernel_selftest.cpp"), cases


@pytest.mark.parametrize("cpu, expected_sets", [
    ("max", "scalar neon neon-dotprod neon-i8mm"),  # an ARMv8.6 core (Apple M2+, Graviton 3): SDOT, SMMLA
    ("cortex-a76", "scalar neon neon-dotprod"),  # the Pi 5's core: SDOT, no i8mm
    ("cortex-a53", "scalar neon"),  # an ARMv8.0 core (Pi 3/Zero 2): baseline NEON only
])
def test_neon_kernels_match_numpy_reference_under_qemu(selftest, cpu, expected_sets):
    binary, cases = selftest
    run = subprocess.run([QEMU, "-cpu", cpu, str(binary), str(cases)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"kernel sets: {expected_sets}\n" in run.stdout
    assert " 0 failures" in run.stdout


@pytest.fixture(scope="module")
def engine(runtime, tmp_path_factory) -> Path:
    """The engine as a static AArch64 program (all its sources, the three NEON kernel sets)."""
    return link(runtime, tmp_path_factory.mktemp("aarch64-engine"), "engine_logits.cpp")


@pytest.mark.parametrize("arch, weights, kv", [
    ("llama", {"outtype": "q8_0"}, "f16"),
    ("mistral", {"quant": "q4_0"}, "q8_0"),  # head_dim 32 (below): the q8_0 cache needs whole blocks per head
    ("llama", {"outtype": "f32"}, "q8_0/q4_0"),
    ("qwen3_moe", {"outtype": "f32"}, "f16"),
    ("qwen3_moe", {"quant": "mxfp4_moe"}, "f16"),  # MXFP4 experts (TBL lookups), the rest Q8_0
])
def test_engine_runs_on_aarch64_and_matches_this_machine(engine, tmp_path, arch, weights, kv):
    """Dense and MoE families, quantized and float weights, both KV caches: the AArch64 engine
    (NEON + dot product + i8mm, 2 threads) under qemu gives the logits this machine's engine gives."""
    spec = next(a for a in TINY_ARCHS if a.name == arch)
    overrides = {"head_dim": 32} if kv != "f16" else {}
    gguf = convert(make_tiny_checkpoint(tmp_path / arch, spec, **overrides), tmp_path / f"{arch}.gguf", **weights)
    config = engine_config(read_header(gguf))
    (tmp_path / "config.txt").write_text("".join(f"{k} {float(v)}\n" for k, v in config.items()))
    tokens = np.random.default_rng(3).integers(3, 300, 40).astype("<i4")
    tokens.tofile(tmp_path / "tokens.bin")
    run = subprocess.run([QEMU, "-cpu", "max", str(engine), str(gguf), str(tmp_path / "config.txt"),
                          str(tmp_path / "tokens.bin"), str(tmp_path / "logits.bin"), "2", kv],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kernel set neon-i8mm" in run.stdout
    theirs = np.fromfile(tmp_path / "logits.bin", dtype="<f4").reshape(len(tokens), -1)
    backend = NativeBackend(gguf, n_ctx=256, threads=2, kv_cache=kv)
    ours = backend.eval_logits([int(t) for t in tokens])
    backend.close()
    # the same algorithm (int8 activations for quantized weights) in other kernels: float rounding apart
    if kv == "f16":
        np.testing.assert_allclose(theirs, ours, atol=2e-3, rtol=1e-3)
    else:
        # a quantized cache rounds keys and values to int8 or 4 bits: a last-bit difference upstream can
        # move a code by one step, so compare distributions (the q8_0 case: KLD 1e-5; the q8_0 cache
        # against f16: 1e-4)
        assert kld(ours, theirs) < 5e-5
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.95
