"""Performance and efficiency cores of this machine, for sizing thread pools.

Decode threads meet at a barrier after every matrix product, so the step runs at the pace of the
slowest thread: a thread on an efficiency core, or on the second hyper-thread of a core already
busy, slows every token down. The default is therefore one thread per physical performance core
the process may run on (llama.cpp's default too).

How the cores are told apart (Linux sysfs under `root`, normally /sys):
- Intel hybrid (Alder Lake and later): the kernel's own split, /sys/devices/cpu_core/cpus (P) and
  /sys/devices/cpu_atom/cpus (E).
- Arm big.LITTLE / DynamIQ: devices/system/cpu/cpuN/cpu_capacity (the scheduler's relative
  capacity, from the device tree), else cpufreq/cpuinfo_max_freq. A core below EFFICIENCY_RATIO of
  the fastest one is an efficiency core: Cortex-A55 against A76 (RK3588) is ~0.5, Apple's E against
  P cores under Asahi ~0.45, while x86 "favoured cores" (Turbo Boost Max 3.0) and prime-vs-big Arm
  clusters differ by 5-20 % and all stay performance cores.
- macOS: sysctl hw.perflevel0.physicalcpu (P) and hw.perflevel1.physicalcpu (E).
- otherwise every core is a performance core.
Logical CPUs sharing topology/thread_siblings_list are one physical core.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EFFICIENCY_RATIO = 0.75  # capacity or max frequency below this fraction of the fastest core: an efficiency core


@dataclass(frozen=True)
class CoreLayout:
    """Physical cores by kind, among the CPUs asked about."""

    performance: int
    efficiency: int
    performance_cpus: tuple[int, ...]  # one logical CPU id per physical performance core (empty off Linux)
    source: str  # how the split was told

    @property
    def threads(self) -> int:
        """Threads for generation: one per physical performance core (the efficiency cores when
        the process may use no performance core; at least one)."""
        return max(1, self.performance or self.efficiency)


def parse_cpu_list(text: str) -> list[int]:
    """ "0-3,8,10-11" (sysfs cpu lists) -> [0, 1, 2, 3, 8, 10, 11]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _physical(cpus: list[int], cpu_dir: Path) -> list[int]:
    """One logical CPU (the lowest id) per physical core among `cpus`."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for cpu in sorted(cpus):
        siblings = _read(cpu_dir / f"cpu{cpu}" / "topology" / "thread_siblings_list")
        key = tuple(parse_cpu_list(siblings)) if siblings else (cpu,)
        if key not in seen:
            seen.add(key)
            out.append(cpu)
    return out


def _linux_layout(cpus: list[int], root: Path) -> CoreLayout | None:
    cpu_dir = root / "devices" / "system" / "cpu"
    core_list, atom_list = _read(root / "devices" / "cpu_core" / "cpus"), _read(root / "devices" / "cpu_atom" / "cpus")
    if core_list is not None and atom_list is not None:
        p_set = set(parse_cpu_list(core_list))
        p = _physical([c for c in cpus if c in p_set], cpu_dir)
        e = _physical([c for c in cpus if c not in p_set], cpu_dir)
        return CoreLayout(len(p), len(e), tuple(p), "sysfs cpu_core / cpu_atom (Intel hybrid)")
    for name, what in (("cpu_capacity", "cpu_capacity"), ("cpufreq/cpuinfo_max_freq", "cpufreq max frequency")):
        values = {c: _read(cpu_dir / f"cpu{c}" / name) for c in cpus}
        if not values or any(v is None or not v.isdigit() for v in values.values()):
            continue
        speed = {c: int(v) for c, v in values.items()}
        fastest = max(speed.values())
        if fastest <= 0:
            continue
        p = _physical([c for c in cpus if speed[c] >= EFFICIENCY_RATIO * fastest], cpu_dir)
        e = _physical([c for c in cpus if speed[c] < EFFICIENCY_RATIO * fastest], cpu_dir)
        return CoreLayout(len(p), len(e), tuple(p), f"sysfs {what}")
    if cpu_dir.is_dir():
        p = _physical(cpus, cpu_dir)
        return CoreLayout(len(p), 0, tuple(p), "sysfs topology (no P/E information: all performance cores)")
    return None


def _mac_layout() -> CoreLayout | None:
    def sysctl(key: str) -> int | None:
        try:
            out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
        return int(out) if out.isdigit() else None

    p = sysctl("hw.perflevel0.physicalcpu")
    if p is None:
        return None
    return CoreLayout(p, sysctl("hw.perflevel1.physicalcpu") or 0, (), "sysctl hw.perflevel0/1.physicalcpu")


def allowed_cpus() -> list[int]:
    """Logical CPU ids this process may run on (the affinity mask where the OS has one)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return list(range(os.cpu_count() or 1))


def online_cpus(root: str | Path = "/sys") -> list[int]:
    """Every logical CPU of the machine that is online (not only those this process may use)."""
    text = _read(Path(root) / "devices" / "system" / "cpu" / "online")
    return parse_cpu_list(text) if text else list(range(os.cpu_count() or 1))


def core_layout(cpus: list[int] | None = None, *, root: str | Path = "/sys") -> CoreLayout:
    """Performance and efficiency cores among `cpus` (default: those this process may use)."""
    cpus = allowed_cpus() if cpus is None else sorted(cpus)
    layout = None
    if platform.system() == "Linux" or Path(root) != Path("/sys"):
        layout = _linux_layout(cpus, Path(root))
    elif platform.system() == "Darwin":
        layout = _mac_layout()
    if layout is None:
        layout = CoreLayout(len(cpus), 0, tuple(cpus), "logical CPU count (no topology information)")
    log.debug("cores: %d performance, %d efficiency (%s)", layout.performance, layout.efficiency, layout.source)
    return layout


__all__ = ["CoreLayout", "EFFICIENCY_RATIO", "allowed_cpus", "core_layout", "online_cpus", "parse_cpu_list"]
