"""The AArch64 kernel sets (NEON, NEON + dot product), cross-compiled with Debian's
g++-aarch64-linux-gnu and run under qemu-aarch64 against the numpy reference cases.
`make test` installs both packages (Makefile: aarch64-tools)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kernel_cases import make_cases, write_cases

NATIVE = Path(__file__).resolve().parents[2] / "native"
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"

pytestmark = pytest.mark.skipif(
    shutil.which(CXX) is None or shutil.which(QEMU) is None,
    reason=f"{CXX} and {QEMU} are not installed (Debian: g++-aarch64-linux-gnu qemu-user; `make test` installs them as root)",
)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("aarch64")
    flags = ["-std=c++17", "-O2", f"-I{NATIVE / 'src'}"]
    neon = [CXX, *flags, "-c", str(NATIVE / "src/kernels_neon.cpp"), "-o", str(out / "neon.o")]
    dotprod = [CXX, *flags, "-march=armv8.2-a+dotprod", "-DEDGEAI_DOTPROD", "-c", str(NATIVE / "src/kernels_neon.cpp"),
               "-o", str(out / "neon_dotprod.o")]
    link = [CXX, *flags, "-static", "-DEDGEAI_HAVE_NEON", "-DEDGEAI_HAVE_NEON_DOTPROD",
            str(NATIVE / "tests/kernel_selftest.cpp"), str(NATIVE / "src/kernels.cpp"), str(NATIVE / "src/kernels_scalar.cpp"),
            str(out / "neon.o"), str(out / "neon_dotprod.o"), "-o", str(out / "kernel_selftest")]
    for cmd in (neon, dotprod, link):
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    cases = out / "cases.bin"
    write_cases(make_cases(), cases)
    return out / "kernel_selftest", cases


@pytest.mark.parametrize("cpu, expected_sets", [
    ("max", "scalar neon neon-dotprod"),  # an ARMv8.2+ core (Pi 5, Apple M-series): SDOT
    ("cortex-a53", "scalar neon"),  # an ARMv8.0 core (Pi 3/Zero 2): baseline NEON only
])
def test_neon_kernels_match_numpy_reference_under_qemu(selftest, cpu, expected_sets):
    binary, cases = selftest
    run = subprocess.run([QEMU, "-cpu", cpu, str(binary), str(cases)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"kernel sets: {expected_sets}\n" in run.stdout
    assert " 0 failures" in run.stdout
