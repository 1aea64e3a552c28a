"""This machine in the terms of a device profile: memory, cores, ISA features (CPU flags), and a
short measured memory and disk bandwidth probe; plus the closest profile."""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from edgeai.devices import DeviceProfile, profiles

log = logging.getLogger(__name__)

# What decode reaches of the copy probe's figure (the probe already measures what can be reached,
# unlike the profiles' theoretical peaks).
DECODE_OF_COPY = 1.0
DECODE_OF_COPY_SOURCE = "assumed: the copy probe measures reachable bandwidth, as decode streams weights"

# CPU flag (Linux /proc/cpuinfo, macOS sysctl) -> the ISA feature names profiles use
_X86_FLAGS = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx_vnni": "avx_vnni", "avx512f": "avx512f",
              "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512_vnni": "avx512_vnni",
              "avx512_bf16": "avx512_bf16", "avx512dq": "avx512dq", "avx512cd": "avx512cd",
              "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi", "avx512_vbmi2": "avx512_vbmi2",
              "avx512_bitalg": "avx512_bitalg", "avx512_vpopcntdq": "avx512_vpopcntdq", "avx512_fp16": "avx512_fp16",
              "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16"}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16", "i8mm": "i8mm", "bf16": "bf16",
              "sme": "sme", "sve": "sve"}
_MAC_FLAGS = {"hw.optional.arm.FEAT_DotProd": "dotprod", "hw.optional.arm.FEAT_FP16": "fp16",
              "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_SME": "sme",
              "hw.optional.avx2_0": "avx2", "hw.optional.avx512f": "avx512f"}


def machine_arch() -> str:
    m = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m)


def isa_features() -> tuple[str, ...]:
    """ISA features of this CPU, named as in the profiles."""
    found: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                for flag in value.split():
                    name = _X86_FLAGS.get(flag) or _ARM_FLAGS.get(flag)
                    if name:
                        found.add(name)
                break
    elif platform.system() == "Darwin":
        for key, name in _MAC_FLAGS.items():
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out == "1":
                found.add(name)
        if machine_arch() == "aarch64":
            found.add("neon")
    return tuple(sorted(found))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    return platform.processor() or platform.machine()


def probe_memory_bandwidth(size_bytes: int = 64 * 2**20, seconds: float = 0.3) -> float:
    """Bytes/s of a numpy copy (read + write counted) of `size_bytes`, best of the runs that fit in
    `seconds`: the best run is the least disturbed by other processes."""
    import numpy as np

    src = np.ones(size_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = math.inf
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2 * src.nbytes / best


def probe_storage_read(folder: str | Path | None = None, size_bytes: int = 64 * 2**20) -> tuple[float, bool]:
    """Sequential read bytes/s of a fresh file in `folder` (default: the temp folder), and whether
    the page cache was bypassed (Linux: posix_fadvise DONTNEED after fsync; elsewhere the figure
    may be the cache's)."""
    chunk = os.urandom(4 * 2**20)
    fd, name = tempfile.mkstemp(prefix=".edgeai-probe-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(size_bytes // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        uncached = False
        with open(name, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                uncached = True
            t0 = time.perf_counter()
            n = 0
            while data := f.read(len(chunk)):
                n += len(data)
            elapsed = time.perf_counter() - t0
        return n / elapsed, uncached
    finally:
        os.unlink(name)


def detect(*, probe: bool = True, probe_dir: str | Path | None = None) -> DeviceProfile:
    """This machine as a profile named "this-machine" (bandwidths measured when `probe`, else 0)."""
    import psutil

    from edgeai.devices.cores import core_layout, online_cpus

    memory = psutil.virtual_memory().total
    cores = core_layout(online_cpus())
    mem_bw = probe_memory_bandwidth() if probe else 0.0
    disk_bw, uncached = probe_storage_read(probe_dir) if probe else (0.0, False)
    disk_src = "measured: sequential read of a fresh 64 MiB file" + (
        " (page cache dropped)" if uncached else " (page cache NOT bypassed: may be the cache's speed)")
    return DeviceProfile(
        name="this-machine", title=f"this machine ({platform.node() or 'local'})", family="detected",
        arch=machine_arch(), cpu=cpu_name(), memory_bytes=memory, performance_cores=cores.performance, efficiency_cores=cores.efficiency,
        isa=isa_features(), memory_bandwidth=mem_bw, decode_bandwidth_fraction=DECODE_OF_COPY, storage="local", storage_read=disk_bw,
        os_reserve_bytes=memory - psutil.virtual_memory().available,
        sources={"memory": "psutil.virtual_memory().total", "cpu": f"/proc/cpuinfo; cores: {cores.source}",
                 "isa": "CPU flags (/proc/cpuinfo or sysctl)",
                 "memory_bandwidth_gbs": "measured: best numpy copy of 64 MiB (read + write bytes) over 0.3 s",
                 "decode_bandwidth_fraction": DECODE_OF_COPY_SOURCE,
                 "storage_read_gbs": disk_src, "os_reserve_gb": "memory in use now (total - available)"},
    )


def closest_profile(me: DeviceProfile) -> tuple[DeviceProfile, float]:
    """The profile nearest to `me`, and its distance: same architecture first, then memory size,
    memory bandwidth and core count on log scales, then ISA features `me` lacks or has extra."""
    def distance(p: DeviceProfile) -> float:
        d = 0.0 if p.arch == me.arch else 10.0
        d += abs(math.log(p.memory_bytes / me.memory_bytes))
        if me.memory_bandwidth > 0:  # reachable against reachable: a copy probe is not a peak figure
            d += 0.5 * abs(math.log(p.decode_bandwidth / me.decode_bandwidth))
        d += 0.5 * abs(math.log((p.performance_cores + p.efficiency_cores) / max(1, me.performance_cores + me.efficiency_cores)))
        d += 0.25 * len((set(p.isa) ^ set(me.isa)) & named)
        return d

    # only features some profile names count: a profile that does not list AVX-512 IFMA says nothing of it
    named = {f for p in profiles().values() for f in p.isa}

    best = min(profiles().values(), key=distance)
    return best, distance(best)


__all__ = ["closest_profile", "cpu_name", "detect", "isa_features", "probe_memory_bandwidth", "probe_storage_read"]
