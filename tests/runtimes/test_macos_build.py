"""The engine built for macOS (Apple Silicon and Intel) on this Linux machine, so that a Linux-only
call or header in native/src (O_DIRECT instead of F_NOCACHE, getauxval instead of sysctlbyname,
io_uring, posix_fadvise, ...) fails a test on every run instead of on a Mac.

native/CMakeLists.txt itself is cross-configured (CMAKE_SYSTEM_NAME=Darwin) with zig's clang from
the PyPI package ziglang (`python -m ziglang c++ -target aarch64-macos.11.0`: macOS headers, libc++
and libSystem stubs) as the compiler, so the sources, kernel sets, their flags and EDGEAI_HAVE_<SET>
defines are the project's own, not a copy. The target edgeai_runtime (edgeai_core and every kernel
set with it) is built, then linked with native/tests/engine_logits.cpp into a Mach-O executable with
every object of both archives and no dead-code stripping, so a symbol macOS does not have fails the
link even where the driver does not reach it. The programs are not run (no macOS here).

Not built: src/module.cpp and src/module_runtime.cpp (-DEDGEAI_PYTHON_MODULE=OFF): they need the
target's Python headers and nanobind, which a cross build does not have.

Run time on 2 cores: 15-30 s per target (kernels_x86.cpp is compiled once per x86 set), 30-55 s in
all depending on the machine's load; the first run on a machine adds about 60 s per target while zig
builds its libc++ for macOS into its cache (~/.cache/zig)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[2] / "native"
# cmake from the test extras (PyPI), else the system's
CMAKE = str(Path(sys.executable).parent / "cmake") if (Path(sys.executable).parent / "cmake").exists() else shutil.which("cmake")
# The oldest macOS a build is checked against: the first release on Apple Silicon. A call into an
# API that macOS 11 lacks is an error (-Werror=unguarded-availability*), not a warning.
MACOS = "11.0"
# zig target -> CMAKE_SYSTEM_PROCESSOR (as a Mac reports it), Mach-O CPU type, the kernel sets
# native/CMakeLists.txt builds there (all of them must build: a set whose check fails is left out
# of the engine silently)
TARGETS = {
    "aarch64-macos": ("arm64", 0x0100000C, ["neon", "neon_dotprod", "neon_i8mm"]),
    "x86_64-macos": ("x86_64", 0x01000007, ["avx2", "avx512", "avx_vnni", "avx512_vnni"]),
}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ziglang") is None or CMAKE is None,
    reason="ziglang (the macOS cross toolchain) or cmake is missing: both are in the test extras",
)

# CMake's C++ compiler: zig's clang for one macOS target. zig reads -march=NAME as a CPU name
# (ziglang/zig#4911), so the Arm -march=armvX.Y-a+FEATURE... of native/CMakeLists.txt becomes zig's
# -mcpu=generic+vX_Ya+FEATURE... (zig spells features as LLVM does: dotprod, i8mm).
COMPILER = '''#!{python}
import os, re, sys

def arg(a):
    m = re.fullmatch(r"-march=armv(\\d+)(?:\\.(\\d+))?-a((?:\\+\\w+)*)", a)
    if not m:
        return a
    major, minor, features = m.groups()
    return "-mcpu=generic+v" + major + ("_" + minor if minor else "") + "a" + features

os.execv(sys.executable, [sys.executable, "-m", "ziglang", "c++", "-target", {target!r}, *map(arg, sys.argv[1:])])
'''
# ar and ranlib that know Mach-O objects (the host's may not: the archive needs a symbol index)
TOOL = '''#!{python}
import os, sys
os.execv(sys.executable, [sys.executable, "-m", "ziglang", {tool!r}, *sys.argv[1:]])
'''


def script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)}\n" + done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="module", params=list(TARGETS))
def build(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(target, CMake build folder, linked engine_logits) for one macOS target, built once."""
    target = request.param
    processor = TARGETS[target][0]
    out = tmp_path_factory.mktemp(f"{target}-build")
    python = sys.executable
    cxx = script(out / "cxx", COMPILER.format(python=python, target=f"{target}.{MACOS}"))
    ar = script(out / "ar", TOOL.format(python=python, tool="ar"))
    ranlib = script(out / "ranlib", TOOL.format(python=python, tool="ranlib"))
    # the host's flags and deployment target are not the Mac's
    env = {k: v for k, v in os.environ.items() if k not in ("CXXFLAGS", "CPPFLAGS", "LDFLAGS", "MACOSX_DEPLOYMENT_TARGET")}
    run([CMAKE, "-S", str(NATIVE), "-B", str(out), "-DCMAKE_SYSTEM_NAME=Darwin", f"-DCMAKE_SYSTEM_PROCESSOR={processor}",
         f"-DCMAKE_CXX_COMPILER={cxx}", f"-DCMAKE_AR={ar}", f"-DCMAKE_RANLIB={ranlib}",
         "-DCMAKE_CXX_FLAGS=-Werror=unguarded-availability -Werror=unguarded-availability-new",
         # the configure checks (the kernel sets' instructions) compile and assemble: no link needed
         "-DCMAKE_TRY_COMPILE_TARGET_TYPE=STATIC_LIBRARY",
         "-DEDGEAI_PYTHON_MODULE=OFF", "-DCMAKE_BUILD_TYPE=Release"], env)
    run([CMAKE, "--build", str(out), "--target", "edgeai_runtime", "-j", "2"], env)  # 2 compiles at a time
    engine = out / "engine_logits"
    # -force_load: every object of both archives; --no-gc-sections: zig's linker strips dead code
    # (when optimizing) before it reports undefined symbols, which would hide a call nothing reaches
    run([cxx, "-std=c++17", "-O1", f"-I{NATIVE / 'src'}", str(NATIVE / "tests" / "engine_logits.cpp"),
         "-Wl,--no-gc-sections", f"-Wl,-force_load,{out / 'libedgeai_runtime.a'}",
         f"-Wl,-force_load,{out / 'libedgeai_core.a'}", "-o", str(engine)], env)
    return target, out, engine


def test_engine_links_into_a_macos_program(build):
    target, _, engine = build
    magic, cpu_type, _, file_type = struct.unpack("<IiiI", engine.read_bytes()[:16])
    assert magic == 0xFEEDFACF, "not a 64-bit Mach-O file"
    assert cpu_type == TARGETS[target][1]
    assert file_type == 2  # MH_EXECUTE


def test_every_kernel_set_builds_for_macos(build):
    target, out, _ = build
    missing = [s for s in TARGETS[target][2] if not any((out / "CMakeFiles" / f"edgeai_kernels_{s}.dir").rglob("*.o"))]
    assert not missing, f"kernel sets not built (their check failed: {out}/CMakeFiles/CMakeConfigureLog.yaml): {missing}"
