"""Runs freestanding x86-64 code in an emulated CPU that has instructions this machine lacks
(AVX-512, AVX-512 VNNI, AVX-VNNI), with Bochs' CPU model through `bochscpu-python` (PyPI).

Run as a script, in a process with the environment `prepare` returns (two work-arounds need it):

    python x86emu.py PROGRAM.elf CASES.bin   ->  JSON {"cpu": {...}, "checks": N, "failed": K, "failures": [...],
                                                      "results_hash": "..."}

loads PROGRAM (a static, non-PIE ELF built from native/tests/kernel_selftest_bare.cpp) at its
link addresses, writes the cases file (tests/runtimes/kernel_cases.py) into memory, calls
`edgeai_selftest` in 64-bit user mode, and reads the results back.

Two things about the PyPI wheel (0.4.0) are worked around, both checked before use:
* it is labelled manylinux_2_28 but calls two glibc 2.38 symbols (__isoc23_strtoull,
  __isoc23_sscanf); `prepare` compiles them from the C library's own functions into a small
  library the emulator process preloads;
* its CPU model is fixed when the library is built (a Cannon Lake: AVX-512 without VNNI), as an
  immediate operand of the call that declares Bochs' `cpu.model` parameter; `prepare` copies the
  package and sets that operand to the model asked for. The emulated CPU's CPUID is then read
  (`cpu` in the result) and the tests check it has what the kernel set needs.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

PAGE = 4096
# Bochs' cpudb index of each model the tests use, and what it has
MODELS = {
    "skylake_x": 26,  # AVX-512 F/BW/VL/DQ, no VNNI
    "sapphire_rapids": 30,  # AVX-512 with VNNI, and AVX-VNNI
    "arrow_lake": 31,  # AVX-VNNI, no AVX-512
}
# `mov r8d, 28; mov r9d, 27`: (number of model names, index of the default model) before the call
# that makes the cpu.model parameter in bochscpu 0.4.0
MODEL_OPERANDS = bytes.fromhex("41b81c00000041b91b000000")
SHIM_C = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
unsigned long long __isoc23_strtoull(const char *s, char **end, int base) { return strtoull(s, end, base); }
int __isoc23_sscanf(const char *s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int r = vsscanf(s, fmt, ap);
    va_end(ap);
    return r;
}
"""


def prepare(work: Path, model: str) -> dict[str, str]:
    """The environment for a process that emulates `model`: a copy of the bochscpu package with
    that CPU model (PYTHONPATH) and the glibc shim (LD_PRELOAD). Raises RuntimeError when the
    installed package is not the one this knows how to adjust."""
    import importlib.util

    spec = importlib.util.find_spec("bochscpu")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("bochscpu-python is not installed")
    src = Path(next(iter(spec.submodule_search_locations)))
    dst = work / f"bochscpu-{model}"
    if not dst.is_dir():
        shutil.copytree(src, dst / "bochscpu")
        lib = next((dst / "bochscpu").glob("_bochscpu*.so"))
        data = bytearray(lib.read_bytes())
        if data.count(MODEL_OPERANDS) != 1:
            raise RuntimeError(f"{lib}: not the bochscpu build whose CPU model this knows how to set")
        at = data.find(MODEL_OPERANDS)
        index = MODELS[model]
        # one more name than the index: the list is read that far, and no further
        data[at:at + 12] = b"\x41\xb8" + struct.pack("<I", index + 1) + b"\x41\xb9" + struct.pack("<I", index)
        lib.write_bytes(bytes(data))
    shim = work / "glibc238_shim.so"
    if not shim.is_file():
        (work / "glibc238_shim.c").write_text(SHIM_C)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", str(work / "glibc238_shim.c"), "-o", str(shim)], check=True,
                       capture_output=True)
    return {"PYTHONPATH": str(dst), "LD_PRELOAD": str(shim)}


class Machine:
    """A 64-bit user-mode address space holding one static ELF, identity-mapped (virtual address =
    physical address), with a stack and a bump-allocated data area."""

    STACK, DATA = 0x7000_0000, 0x1000_0000

    def __init__(self, elf: Path):
        import bochscpu.memory

        self.mem = bochscpu.memory
        self.table = bochscpu.memory.PageMapLevel4Table()
        self.mapped: set[int] = set()
        data = elf.read_bytes()
        if data[:4] != b"\x7fELF" or data[4] != 2:
            raise ValueError(f"{elf}: not a 64-bit ELF")
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        for i in range(phnum):
            p_type, _, offset, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
            if p_type == 1:  # PT_LOAD (memsz past filesz is .bss: fresh pages are zero)
                self.map(vaddr, memsz)
                self.write(vaddr, data[offset:offset + filesz])
        self.symbols = self._symbols(data)
        self.map(self.STACK, 16 * PAGE)
        self.top = self.DATA

    @staticmethod
    def _symbols(data: bytes) -> dict[str, int]:
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        out = {}
        for sec in sections:
            if sec[1] != 2:  # SHT_SYMTAB
                continue
            strtab = sections[sec[6]][4]
            for j in range(sec[5] // 24):
                name, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", data, sec[4] + j * 24)
                end = data.index(b"\0", strtab + name)
                if end > strtab + name:
                    out[data[strtab + name:end].decode()] = value
        return out

    def map(self, addr: int, size: int) -> None:
        for page in range(addr & ~(PAGE - 1), addr + size, PAGE):
            if page not in self.mapped:
                self.mem.page_insert(page, self.mem.allocate_host_page())
                self.table.insert(page, page, 1)  # writable, executable
                self.mapped.add(page)

    def write(self, addr: int, data: bytes) -> None:
        at = 0
        while at < len(data):
            n = min(len(data) - at, PAGE - (addr + at) % PAGE)
            self.mem.phy_write(addr + at, list(data[at:at + n]))
            at += n

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        while size:
            n = min(size, PAGE - addr % PAGE)
            out += bytes(self.mem.phy_read(addr, n))
            addr, size = addr + n, size - n
        return bytes(out)

    def alloc(self, data: bytes | int, align: int = 64) -> int:
        size = data if isinstance(data, int) else len(data)
        addr = (self.top + align - 1) & ~(align - 1)
        self.map(addr, max(size, 1))
        if not isinstance(data, int):
            self.write(addr, data)
        self.top = addr + size
        return addr

    def call(self, function: str, *args: int, returns_to: str = "edgeai_selftest_return") -> None:
        """Calls `function` (System V ABI, integer arguments) in ring 3 with AVX-512 state enabled;
        it returns to the `hlt` at `returns_to`, whose #GP in user mode ends the run. Any other
        exception (#UD: an instruction the emulated CPU lacks) raises RuntimeError."""
        import bochscpu
        import bochscpu.cpu

        pml4 = 0x3000_0000
        for hva, gpa in self.table.commit(pml4):
            self.mem.page_insert(gpa, hva)
        session = bochscpu.Session()

        def missing_page(gpa: int) -> None:
            raise RuntimeError(f"access to unmapped memory at {gpa:#x}")

        session.missing_page_handler = missing_page
        state = bochscpu.State()
        bochscpu.cpu.set_long_mode(state)
        cr4 = bochscpu.cpu.ControlRegister(state.cr4)
        cr4.OSFXSR = cr4.OSXMMEXCPT = cr4.OSXSAVE = True
        state.cr4 = int(cr4)
        state.xcr0 = 0xE7  # x87, SSE, AVX, and the AVX-512 opmask/ZMM state
        state.mxcsr = 0x1F80
        state.cr3 = pml4
        ret = self.symbols[returns_to]
        rsp = self.STACK + 8 * PAGE  # 16-byte aligned before the call pushed the return address
        self.write(rsp - 8, struct.pack("<Q", ret))
        state.rsp, state.rip = rsp - 8, self.symbols[function]
        for reg, value in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            setattr(state, reg, value)
        code, data_seg = bochscpu.Segment(), bochscpu.Segment()
        for seg, selector, attr in ((code, 0x33, 0x22FB), (data_seg, 0x2B, 0xCF3)):  # 64-bit ring-3 code, data
            seg.present, seg.selector, seg.base, seg.limit, seg.attr = True, selector, 0, 0xFFFFFFFF, attr
        state.cs = code
        state.ds = state.ss = state.es = state.fs = state.gs = data_seg
        session.cpu.state = state
        stop: list[tuple[int, int]] = []

        def exception(sess, _cpu, vector: int, error: int) -> None:
            stop.append((vector, sess.cpu.rip))
            sess.stop()

        hook = bochscpu.Hook()
        hook.exception = exception
        session.run([hook])
        vector, rip = stop[0] if stop else (-1, session.cpu.rip)
        if not (vector == 13 and rip in (ret, ret + 1)):
            names = {6: "#UD (an instruction this CPU model lacks)", 13: "#GP", 14: "#PF"}
            raise RuntimeError(f"{function} stopped by exception {names.get(vector, vector)} at {rip:#x}")


def cpu_features(machine: Machine) -> dict:
    """CPUID of the emulated CPU, through `edgeai_cpuid` of the program."""
    out = machine.alloc(64)
    machine.call("edgeai_cpuid", out)
    words = struct.unpack("<16I", machine.read(out, 64))
    leaf7_ebx, leaf7_ecx, leaf7_1_eax = words[0], words[1], words[3]
    return {"brand": machine.read(out + 16, 48).split(b"\0")[0].decode().strip(),
            "avx512f": bool(leaf7_ebx >> 16 & 1), "avx512bw": bool(leaf7_ebx >> 30 & 1),
            "avx512vl": bool(leaf7_ebx >> 31 & 1), "avx512dq": bool(leaf7_ebx >> 17 & 1),
            "avx512vnni": bool(leaf7_ecx >> 11 & 1), "avxvnni": bool(leaf7_1_eax >> 4 & 1)}


def run_selftest(elf: Path, cases: Path) -> dict:
    """Loads the program, runs edgeai_selftest over the cases; the CPU's features, the kernel sets
    the engine's own detection allows there, and the results."""
    m = Machine(elf)
    cpu = cpu_features(m)
    sets_at = m.alloc(16)
    m.call("edgeai_x86_sets", sets_at)
    allowed = dict(zip(("avx2", "avx512", "avx-vnni", "avx512-vnni"), struct.unpack("<4I", m.read(sets_at, 16))))
    cpu["sets"] = sorted(k for k, v in allowed.items() if v)
    raw = cases.read_bytes()
    cases_at = m.alloc(raw)
    scratch = m.alloc(1 << 20)
    max_failures = 64
    failures_at = m.alloc(max_failures * 40)
    out = m.alloc(16)
    m.call("edgeai_selftest", cases_at, scratch, failures_at, max_failures, out)
    checks, failed, hash_lo, hash_hi = struct.unpack("<IIII", m.read(out, 16))
    records = [struct.unpack_from("<IIIIddd", m.read(failures_at + 40 * i, 40)) for i in range(min(failed, max_failures))]
    keys = ("kernel", "type", "n", "row", "got", "expected", "tolerance")
    return {"cpu": cpu, "checks": checks, "failed": failed, "failures": [dict(zip(keys, r)) for r in records],
            "results_hash": f"{hash_hi:08x}{hash_lo:08x}"}


if __name__ == "__main__":
    print(json.dumps(run_selftest(Path(sys.argv[1]), Path(sys.argv[2]))))
