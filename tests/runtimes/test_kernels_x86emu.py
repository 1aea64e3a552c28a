"""The x86 kernel sets this CPU may lack (AVX-512, AVX-VNNI, AVX-512 VNNI), built freestanding
(native/tests/kernel_selftest_bare.cpp) with the flags CMakeLists.txt gives each set, and run in
an emulated CPU of a model that has the instructions (Bochs through bochscpu-python, a test
dependency: tests/runtimes/x86emu.py) against the numpy reference cases of kernel_cases.py."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import x86emu
from kernel_cases import make_cases, write_cases

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
# set -> (compiler flags and defines as in native/CMakeLists.txt, ops function, emulated model, CPUID features it needs)
SETS = {
    "avx2": (AVX2, "ops_avx2", "arrow_lake", []),
    "avx512": (AVX512 + ["-DEDGEAI_AVX512"], "ops_avx512", "skylake_x", ["avx512f", "avx512bw", "avx512vl", "avx512dq"]),
    "avx-vnni": (AVX2 + ["-mavxvnni", "-DEDGEAI_AVX_VNNI"], "ops_avx_vnni", "arrow_lake", ["avxvnni"]),
    "avx512-vnni": (AVX512 + ["-mavx512vnni", "-DEDGEAI_AVX512_VNNI"], "ops_avx512_vnni", "sapphire_rapids",
                    ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni"]),
}
# what the engine's detection (native/src/cpu_x86.hpp) must allow on each emulated model
ALLOWED = {
    "skylake_x": ["avx2", "avx512"],
    "arrow_lake": ["avx-vnni", "avx2"],
    "sapphire_rapids": ["avx-vnni", "avx2", "avx512", "avx512-vnni"],
}

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux",
                       reason="the emulated x86 kernel sets are tested on x86-64 Linux (bochscpu's wheel)"),
    pytest.mark.skipif(importlib.util.find_spec("bochscpu") is None,
                       reason="bochscpu-python is not installed (a test dependency: pip install '.[test]')"),
    pytest.mark.skipif(shutil.which("g++") is None or shutil.which("gcc") is None, reason="g++/gcc are not installed"),
]


def build(out: Path, name: str) -> Path:
    flags, ops, _, _ = SETS[name]
    elf = out / f"{name}.elf"
    cmd = ["g++", "-std=c++17", "-O3", "-nostdlib", "-static", "-fno-pie", "-no-pie", "-fno-exceptions",
           "-fno-rtti", "-fno-asynchronous-unwind-tables", "-fno-stack-protector", "-Wno-ignored-attributes",
           f"-I{NATIVE / 'src'}", f"-I{NATIVE / 'tests'}", *flags, f"-DEDGEAI_SET={ops}",
           str(NATIVE / "tests/kernel_selftest_bare.cpp"), str(NATIVE / "src/kernels_x86.cpp"), "-o", str(elf)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"building the {name} self-test failed:\n{run.stderr[-3000:]}")
    return elf


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("x86emu")
    write_cases(make_cases(), out / "cases.bin")
    return out


def emulate(work: Path, elf: Path, model: str) -> subprocess.CompletedProcess:
    env = dict(os.environ) | x86emu.prepare(work, model)
    return subprocess.run([sys.executable, str(Path(x86emu.__file__)), str(elf), str(work / "cases.bin")], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(work) -> dict[str, dict]:
    """Each set's self-test in its emulated CPU: set -> result (x86emu.run_selftest)."""
    out = {}
    for name, (_, _, model, _) in SETS.items():
        run = emulate(work, build(work, name), model)
        assert run.returncode == 0, run.stdout + run.stderr
        out[name] = json.loads(run.stdout)
    return out


@pytest.mark.parametrize("name", list(SETS))
def test_x86_kernel_set_matches_numpy_reference_in_emulated_cpu(results, name):
    _, _, model, features = SETS[name]
    result = results[name]
    missing = [f for f in features if not result["cpu"][f]]
    assert not missing, f"the emulated {result['cpu']['brand']} lacks {missing}"
    assert result["cpu"]["sets"] == ALLOWED[model], result["cpu"]
    assert result["failed"] == 0, result["failures"][:5]
    # every case of every type reached its kernels (dot, gemm at 1/2/3/9 tokens, Q8_0's KV kernels, packed types)
    assert result["checks"] >= 14000


def test_x86_kernel_sets_compute_bit_identical_results(results):
    """The same integer sums and float steps in every set (kernels_x86.cpp): the quantized kernels'
    results hash alike."""
    hashes = {name: r["results_hash"] for name, r in results.items()}
    assert len(set(hashes.values())) == 1, hashes
    assert hashes["avx2"] != "cbf29ce484222325"  # FNV-1a of nothing: no result was hashed


@pytest.mark.parametrize("name", ["avx-vnni", "avx512-vnni"])
def test_vnni_sets_multiply_bytes_with_vpdpbusd(work, name):
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    code = subprocess.run(["objdump", "-d", str(build(work, name))], capture_output=True, text=True, check=True).stdout
    dpbusd = [line for line in code.splitlines() if "vpdpbusd" in line]
    assert dpbusd, f"the {name} set has no vpdpbusd"
    # the VEX form ({vex}) on AVX-VNNI CPUs, which have no AVX-512; the EVEX form otherwise
    assert all(("{vex}" in line) == (name == "avx-vnni") for line in dpbusd)


def test_emulated_cpu_refuses_instructions_its_model_lacks(work):
    """The emulator is strict (so the runs above prove something): the AVX-512 set stops with #UD on
    a CPU without AVX-512."""
    run = emulate(work, build(work, "avx512-vnni"), "arrow_lake")
    assert run.returncode != 0
    assert "#UD" in run.stderr


@pytest.mark.parametrize("name", list(SETS))
def test_kernel_set_objects_share_no_code(tmp_path, name):
    """Each set's object defines no weak symbols: the linker keeps one copy of a weak symbol for
    every caller, so a std::vector member or an inline helper compiled for AVX-512 would run on
    CPUs without it (kernels_common.hpp keeps its helpers internal, Packed8 its own buffers)."""
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    flags, *_ = SETS[name]
    obj = tmp_path / f"{name}.o"
    subprocess.run(["g++", "-std=c++17", "-O3", "-fPIC", f"-I{NATIVE / 'src'}", *flags, "-c",
                    str(NATIVE / "src/kernels_x86.cpp"), "-o", str(obj)], check=True, capture_output=True)
    symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout.splitlines()
    # nm lines: "ADDRESS TYPE NAME" when defined (TYPE W/V/v: weak, u: unique global), "U NAME" otherwise
    weak = [line for line in symbols if len(line.split(maxsplit=2)) == 3 and line.split(maxsplit=2)[1] in ("W", "V", "v", "u")
            and "DW.ref.__gxx_personality_v0" not in line]
    assert not weak, weak
