"""Performance / efficiency core detection on sysfs trees laid out as the kernel writes them for
an Intel hybrid laptop, an Arm big.LITTLE board, an x86 CPU with favoured cores, and a plain VM."""

from __future__ import annotations

from pathlib import Path

from edgeai.devices import default_threads
from edgeai.devices.cores import allowed_cpus, core_layout, parse_cpu_list


def fake_sysfs(root: Path, siblings: list[list[int]], *, capacity: dict[int, int] | None = None,
               max_freq: dict[int, int] | None = None, hybrid: tuple[str, str] | None = None) -> Path:
    """/sys with one thread_siblings_list per logical CPU (`siblings`: the CPUs of each physical core)."""
    cpu_dir = root / "devices" / "system" / "cpu"
    all_cpus = sorted(c for core in siblings for c in core)
    for core in siblings:
        for cpu in core:
            topo = cpu_dir / f"cpu{cpu}" / "topology"
            topo.mkdir(parents=True)
            (topo / "thread_siblings_list").write_text(",".join(map(str, core)) + "\n")
            if capacity:
                (cpu_dir / f"cpu{cpu}" / "cpu_capacity").write_text(f"{capacity[cpu]}\n")
            if max_freq:
                (cpu_dir / f"cpu{cpu}" / "cpufreq").mkdir()
                (cpu_dir / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq").write_text(f"{max_freq[cpu]}\n")
    (cpu_dir / "online").write_text(f"0-{all_cpus[-1]}\n")
    if hybrid:
        for name, cpus in zip(("cpu_core", "cpu_atom"), hybrid):
            (root / "devices" / name).mkdir(parents=True)
            (root / "devices" / name / "cpus").write_text(cpus + "\n")
    return root


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("5") == [5]


def test_intel_hybrid_counts_physical_p_cores(tmp_path):
    # i7-1260P-like: 4 P cores with hyper-threading (CPUs 0-7), 8 E cores (CPUs 8-15)
    root = fake_sysfs(tmp_path, [[2 * i, 2 * i + 1] for i in range(4)] + [[c] for c in range(8, 16)],
                      hybrid=("0-7", "8-15"), max_freq={c: 4_700_000 if c < 8 else 3_400_000 for c in range(16)})
    every = core_layout(list(range(16)), root=root)
    assert (every.performance, every.efficiency, every.threads) == (4, 8, 4)
    assert every.performance_cpus == (0, 2, 4, 6) and "cpu_core" in every.source
    # a process pinned to two P hyper-threads of one core and two E cores: one P thread
    pinned = core_layout([0, 1, 8, 9], root=root)
    assert (pinned.performance, pinned.efficiency, pinned.threads) == (1, 2, 1)
    # pinned to E cores only: they are all it has
    assert core_layout([8, 9, 10], root=root).threads == 3


def test_arm_big_little_by_capacity(tmp_path):
    # RK3588: 4x Cortex-A55 (capacity 530) then 4x Cortex-A76 (1024), no SMT
    root = fake_sysfs(tmp_path, [[c] for c in range(8)], capacity={c: 530 if c < 4 else 1024 for c in range(8)})
    layout = core_layout(list(range(8)), root=root)
    assert (layout.performance, layout.efficiency) == (4, 4) and layout.performance_cpus == (4, 5, 6, 7)
    assert "cpu_capacity" in layout.source


def test_favoured_cores_are_not_efficiency_cores(tmp_path):
    # Turbo Boost Max 3.0: two cores boost 6 % higher; all eight are performance cores
    root = fake_sysfs(tmp_path, [[c, c + 8] for c in range(8)],
                      max_freq={c: 5_300_000 if c % 8 < 2 else 5_000_000 for c in range(16)})
    layout = core_layout(list(range(16)), root=root)
    assert (layout.performance, layout.efficiency, layout.threads) == (8, 0, 8)
    assert "max frequency" in layout.source


def test_no_p_e_information_counts_physical_cores(tmp_path):
    root = fake_sysfs(tmp_path, [[0, 2], [1, 3]])
    layout = core_layout([0, 1, 2, 3], root=root)
    assert (layout.performance, layout.efficiency) == (2, 0) and "topology" in layout.source


def test_this_machine():
    layout = core_layout()
    assert 1 <= layout.threads <= len(allowed_cpus())
    assert default_threads() == layout.threads
