"""Device profiles as data (`devices/profiles/*.json`, one file per device family, every figure
with its source), and detection of the current machine in the same terms (`devices.detect`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from edgeai.errors import DeviceError

log = logging.getLogger(__name__)

GB = 1000**3  # vendors sell memory in GB meaning GiB; bandwidths are decimal


@dataclass(frozen=True)
class DeviceProfile:
    """One device: memory, cores, ISA features, memory and storage bandwidth."""

    name: str  # e.g. "pi5-8gb-nvme": what --device takes
    title: str
    family: str
    arch: str  # "aarch64" | "x86_64"
    cpu: str
    memory_bytes: int
    performance_cores: int
    efficiency_cores: int
    isa: tuple[str, ...]
    memory_bandwidth: float  # bytes/s, the figure in `sources`
    decode_bandwidth_fraction: float  # of memory_bandwidth, what LLM decode reaches on this device (`sources`)
    storage: str  # "sd" | "nvme" | ...
    storage_read: float  # bytes/s, sequential
    os_reserve_bytes: int  # what the OS and a typical session keep for themselves
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def threads(self) -> int:
        """Threads for token generation: the performance cores (efficiency cores slow the slowest thread down)."""
        return self.performance_cores

    @property
    def decode_bandwidth(self) -> float:
        """Bytes/s a decode step streams weights at: the memory bandwidth times the measured fraction."""
        return self.memory_bandwidth * self.decode_bandwidth_fraction

    @property
    def default_budget(self) -> int:
        """Memory edgeai may use by default: all of it but the OS reserve."""
        return self.memory_bytes - self.os_reserve_bytes


def _memory_bytes(gb: float) -> int:
    return int(gb * 1024**3)  # "8 GB" of RAM is 8 GiB


@lru_cache(maxsize=1)
def profiles() -> dict[str, DeviceProfile]:
    """Every profile, by name, in file order."""
    out: dict[str, DeviceProfile] = {}
    folder = resources.files(__name__) / "profiles"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            fam = json.loads(entry.read_text(encoding="utf-8"))
            for v in fam["variants"]:
                out[v["name"]] = DeviceProfile(
                    name=v["name"], title=v["title"], family=fam["family"], arch=fam["arch"], cpu=fam["cpu"],
                    memory_bytes=_memory_bytes(v["memory_gb"]), performance_cores=int(fam["performance_cores"]),
                    efficiency_cores=int(fam["efficiency_cores"]), isa=tuple(fam["isa"]),
                    memory_bandwidth=float(fam["memory_bandwidth_gbs"]) * GB,
                    decode_bandwidth_fraction=float(fam["decode_bandwidth_fraction"]), storage=v["storage"],
                    storage_read=float(v["storage_read_gbs"]) * GB,
                    os_reserve_bytes=_memory_bytes(fam["os_reserve_gb"]), sources=dict(fam["sources"]),
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise DeviceError(f"device profile file {entry.name} is malformed: {exc!r}") from exc
    return out


def get_profile(name: str) -> DeviceProfile:
    """The profile `name`; a DeviceError lists the known ones."""
    table = profiles()
    key = name.strip().lower()
    if key not in table:
        raise DeviceError(f"unknown device {name!r}; known devices: {', '.join(table)} (see `edgeai devices`)")
    return table[key]


def default_threads() -> int:
    """Threads a model runs with when nobody says: one per physical performance core this process
    may use (`devices.cores`: hybrid CPUs' efficiency cores and second hyper-threads left out)."""
    from edgeai.devices.cores import core_layout

    return core_layout().threads


def checked_threads(threads: int | None) -> int:
    """The threads a backend starts: `default_threads()` for None; at most one per CPU this process may
    use (a spinning thread beyond them stalls the machine), capped with a warning; an OptionError below 1."""
    if threads is None:
        return default_threads()
    from edgeai.devices.cores import allowed_cpus
    from edgeai.options import checked_int

    threads = checked_int("threads", threads, minimum=1)
    cpus = len(allowed_cpus())
    if threads > cpus:
        log.warning("threads=%d is more than the %d CPUs this process may use; running %d", threads, cpus, cpus)
        return cpus
    return threads
