"""Hard memory limits for measurements: run a command inside a Linux memory cgroup.

A budget the runtime plans for is only shown by running under a limit the kernel enforces: the
child process is put in a fresh memory cgroup (v2 `memory.max`, or v1 `memory.limit_in_bytes`)
before it starts, so everything it allocates and every page-cache page it brings in is charged to
the limit. Afterwards the cgroup's peak usage and whether the OOM killer fired are read back.
Needs root (or a delegated cgroup); `unavailable()` says why when it cannot be used.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/memory")
_counter = itertools.count()


@dataclass(frozen=True)
class LimitedRun:
    """What a command did under a memory limit."""

    returncode: int
    limit: int  # bytes
    peak: int  # the cgroup's highest charge (bytes): process memory and its page cache
    oom_killed: bool
    stdout: str
    stderr: str
    seconds: float


def _v2_root() -> Path | None:
    ctrl = V2_ROOT / "cgroup.controllers"
    if ctrl.is_file() and "memory" in ctrl.read_text().split():
        return V2_ROOT
    return None


def unavailable() -> str | None:
    """None when run_limited() can work here, else why not."""
    if os.name != "posix" or not Path("/proc/self/cgroup").exists():
        return "memory cgroups are a Linux feature"
    root = _v2_root() or (V1_ROOT if (V1_ROOT / "memory.limit_in_bytes").exists() else None)
    if root is None:
        return "no cgroup memory controller is mounted (neither cgroup v2 with 'memory' nor v1 /sys/fs/cgroup/memory)"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (run as root, or in a delegated cgroup)"
    return None


def drop_file_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache (the next reads come from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_limited(cmd: list[str], limit: int, *, timeout: float = 600, env: dict | None = None,
                cwd: str | None = None) -> LimitedRun:
    """Run `cmd` with at most `limit` bytes of memory (process + page cache) and report its peak.

    Raises RuntimeError when cgroups cannot be used (see `unavailable`). A command still running
    after `timeout` seconds is killed (returncode -9, not counted as an OOM kill).
    """
    why = unavailable()
    if why:
        raise RuntimeError(why)
    v2 = _v2_root()
    group = (v2 or V1_ROOT) / f"edgeai-{os.getpid()}-{next(_counter)}"
    group.mkdir()
    try:
        if v2:
            (group / "memory.max").write_text(str(limit))
            (group / "memory.swap.max").write_text("0") if (group / "memory.swap.max").exists() else None
        else:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            try:
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping around the limit
            except OSError:
                pass
        procs = str(group / "cgroup.procs")

        def enter() -> None:  # in the child, before exec: everything it does is charged
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                preexec_fn=enter)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate()
        seconds = time.perf_counter() - t0
        if v2:
            peak_file = group / "memory.peak"
            peak = int(peak_file.read_text()) if peak_file.exists() else 0
            events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
            oom = int(events.get("oom_kill", 0)) > 0
        else:
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            control = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
            oom = int(control.get("oom_kill", 0)) > 0 or (proc.returncode == -signal.SIGKILL and
                                                          int((group / "memory.failcnt").read_text()) > 0)
        return LimitedRun(proc.returncode, limit, peak, oom, out, err, seconds)
    finally:
        _remove(group)


def _remove(group: Path) -> None:
    for _ in range(50):  # the exited child may take a moment to leave the group
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.02)
