"""MoE experts streamed from disk (issue 7): the same tokens and logits as with every expert in
memory, cache accounting, unaligned and buffered reads, the planner, faults (truncated files,
failing reads), no leaked threads, and a budget enforced by a memory cgroup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgeai.converters.convert import convert
from edgeai.errors import BudgetError, CheckpointError
from edgeai.runtimes.base import GREEDY
from edgeai.gguf_header import read_header
from edgeai.runtimes.native import NativeBackend, engine_config
from edgeai.runtimes.plan import plan_memory
from helpers import TINY_ARCHS, make_tiny_checkpoint, write_random_moe_gguf

MOE_ARCHS = [a for a in TINY_ARCHS if a.name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")]
PROMPT = [int(t) for t in np.random.default_rng(3).integers(3, 300, 70)]  # longer than one prefill batch (64)


@pytest.fixture(scope="module")
def moe_ggufs(tmp_path_factory):
    """Tiny MoE models of every family with 8 experts (2 routed), Q8_0, the converter's 32-byte alignment."""
    root = tmp_path_factory.mktemp("moe-stream")
    out = {}
    for arch in MOE_ARCHS:
        experts = {"num_local_experts": 8} if arch.name == "mixtral" else {"num_experts": 8}
        ckpt = make_tiny_checkpoint(root / arch.name, arch, num_hidden_layers=3, **experts)
        out[arch.name] = convert(ckpt, root / f"{arch.name}.gguf", outtype="q8_0")
    return out


def run(backend: NativeBackend, n: int = 16) -> tuple[np.ndarray, list[int]]:
    """Logits of PROMPT (one prefill) and n greedy tokens after its first 8 tokens."""
    backend.truncate(0)
    logits = backend.eval_logits(PROMPT)
    backend.truncate(0)
    backend.set_sampling(GREEDY)
    out = [backend.step(PROMPT[:8])]
    for _ in range(n - 1):
        out.append(backend.step([out[-1]]))
    return logits, out


@pytest.mark.parametrize("arch", [a.name for a in MOE_ARCHS])
def test_streamed_experts_give_the_same_tokens_and_logits(moe_ggufs, arch):
    path = moe_ggufs[arch]
    with_mmap = NativeBackend(path, n_ctx=128, threads=1)
    ref_logits, ref_tokens = run(with_mmap)
    with_mmap.close()
    # 2 slots: below one token's experts over the 3 layers (6); every policy
    for store in ({"slots": 2}, {"slots": 5, "policy": "lru"}, {"slots": 5, "policy": "lfu"}, {"slots": 5, "policy": "layer"},
                  {"slots": 5, "policy": "next-use"}):
        b = NativeBackend(path, n_ctx=128, threads=1, expert_store={**store, "trace": True})
        logits, tokens = run(b)
        stats = b.stats().extra["expert_store"]
        assert stats["streaming"] and stats["slots"] == store["slots"]
        assert stats["policy"] == store.get("policy", "next-use")  # the engine ran the policy asked for
        np.testing.assert_array_equal(logits, ref_logits)  # same kernels on the same bytes: bit-identical
        assert tokens == ref_tokens, store
        # accounting: never more experts held than slots; every demand access counted once
        assert 0 < stats["peak_slots_used"] <= store["slots"]
        assert stats["hits"] + stats["misses"] == len(b.expert_trace()) > 0
        assert sum(stats["layer_hits"]) == stats["hits"] and sum(stats["layer_misses"]) == stats["misses"]
        assert stats["bytes_read"] >= stats["misses"] * 3  # at least one read per projection of each miss
        b.close()


def test_unaligned_slices_and_buffered_reads(moe_ggufs):
    """The converter's files align tensors to 32 bytes, so expert slices start inside disk blocks:
    reads are rounded out to 4 KiB and the slice found inside. Also without O_DIRECT."""
    path = moe_ggufs["qwen3_moe"]
    header = read_header(path)
    n_expert = int(header.metadata["qwen3moe.expert_count"])
    starts = [t.offset + e * t.nbytes // n_expert for name, t in header.tensors.items() if "_exps." in name
              for e in range(n_expert)]
    assert any(s % 4096 for s in starts), "the test file should have slices that are not 4 KiB aligned"
    ref = NativeBackend(path, n_ctx=128, threads=1)
    ref_logits, _ = run(ref, 1)
    for direct in (True, False):
        for io in ("pread", "auto"):  # auto: io_uring where the kernel allows it
            b = NativeBackend(path, n_ctx=128, threads=1, expert_store={"slots": 3, "direct": direct, "io": io})
            np.testing.assert_array_equal(run(b, 1)[0], ref_logits)
            assert b.stats().extra["expert_store"]["io"] in (("pread",) if io == "pread" else ("pread", "io_uring"))
            b.close()


def test_planner_splits_streams_and_refuses(moe_ggufs):
    path = moe_ggufs["mixtral"]
    header = read_header(path)
    config = engine_config(header)

    def plan(budget):
        return plan_memory(header, config, budget=budget, n_ctx=512, threads=2, process_bytes=50 << 20)

    unlimited = plan(None)
    assert not unlimited.streaming and unlimited.experts > 0 and unlimited.slot_bytes > 0
    assert not plan(unlimited.total).streaming  # everything fits: experts stay memory-mapped
    smallest = plan(unlimited.minimum)
    assert smallest.streaming and smallest.slots == smallest.min_slots and smallest.total <= unlimited.minimum
    middle = plan(unlimited.minimum + 3 * unlimited.slot_bytes + 100)
    assert middle.slots == smallest.min_slots + 3
    with pytest.raises(BudgetError) as err:
        plan(unlimited.minimum - 1)
    assert err.value.minimum == unlimited.minimum
    assert path.name in str(err.value) and "--ctx" in str(err.value)
    # through the backend: refused before anything is loaded
    with pytest.raises(BudgetError):
        NativeBackend(path, n_ctx=128, memory_budget=16 << 20)


def test_q8_0_kv_cache_in_the_plan_and_with_streamed_experts(tmp_path):
    """The planner sizes a q8_0 KV cache at 34/64 of f16's, offers it as a lever when refusing, and
    experts streamed beside a q8_0 cache give the same logits as the memory map."""
    path = write_random_moe_gguf(tmp_path / "moe.gguf", n_layer=2, n_expert=8, n_expert_used=2, alignment=32)  # head_dim 64
    header = read_header(path)
    config = engine_config(header)

    def plan(budget, kv_cache):
        return plan_memory(header, config, budget=budget, n_ctx=2048, threads=2, kv_cache=kv_cache, process_bytes=50 << 20)

    f16, q8 = plan(None, "f16"), plan(None, "q8_0")
    assert q8.kv == f16.kv * 34 // 64
    # (an f16 cache's prompt chunks take a KV head's query heads together: their scores need more scratch)
    assert f16.scratch >= q8.scratch and q8.total == f16.total - (f16.kv - q8.kv) - (f16.scratch - q8.scratch)
    assert ("KV cache", q8.kv, "q8_0, 2048 positions") in q8.rows()
    with pytest.raises(BudgetError, match=r"--kv-cache q8_0\) saves"):
        plan(f16.minimum - 1, "f16")
    with pytest.raises(BudgetError) as err:
        plan(q8.minimum - 1, "q8_0")
    # already taken: only the smaller caches are offered (test_kv4 checks their sizes)
    assert "--kv-cache q8_0)" not in str(err.value) and "--kv-cache q4_0) saves" in str(err.value)

    tokens = PROMPT[:12]
    mapped = NativeBackend(path, n_ctx=64, threads=2, kv_cache="q8_0")
    streamed = NativeBackend(path, n_ctx=64, threads=2, kv_cache="q8_0", expert_store={"slots": 2})
    np.testing.assert_array_equal(mapped.eval_logits(tokens), streamed.eval_logits(tokens))
    mapped.close()
    streamed.close()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
def test_file_truncated_while_running_is_an_error_and_nothing_leaks(moe_ggufs, tmp_path):
    path = tmp_path / "copy.gguf"
    shutil.copy(moe_ggufs["olmoe"], path)
    before = _threads()
    b = NativeBackend(path, n_ctx=128, threads=2, expert_store={"slots": 2, "retries": 1})
    b.set_sampling(GREEDY)
    b.step(PROMPT[:4])
    header = read_header(moe_ggufs["olmoe"])
    first_expert = min(t.offset for name, t in header.tensors.items() if "_exps." in name)
    os.truncate(path, first_expert + 100)  # mid-expert: every expert read now ends early
    b.truncate(0)
    with pytest.raises(CheckpointError, match=r"copy\.gguf.*(truncated|ends)"):
        b.step(PROMPT[:8])
    b.close()
    assert _threads() == before  # the reader threads are joined
    # and a file truncated before loading is refused by the header check
    with pytest.raises(CheckpointError, match="copy.gguf"):
        NativeBackend(path, n_ctx=128, expert_store={"slots": 2})


def test_failing_reads_are_retried_then_reported(moe_ggufs):
    path = moe_ggufs["qwen2_moe"]
    ref = NativeBackend(path, n_ctx=128, threads=1)
    ref_logits, _ = run(ref, 1)
    flaky = NativeBackend(path, n_ctx=128, threads=1, expert_store={"slots": 2, "inject_read_faults": 2, "retries": 3})
    np.testing.assert_array_equal(run(flaky, 1)[0], ref_logits)
    assert flaky.stats().extra["expert_store"]["read_retries"] == 2
    broken = NativeBackend(path, n_ctx=128, threads=1, expert_store={"slots": 2, "inject_read_faults": 1000, "retries": 2})
    with pytest.raises(CheckpointError, match="failed after 3 attempts"):
        broken.step(PROMPT[:8])
    assert broken.stats().extra["expert_store"]["read_failures"] >= 1
    broken.close()


CHILD = textwrap.dedent("""
    import json, sys
    import psutil
    from edgeai.runtimes.base import GREEDY
    from edgeai.runtimes.native import NativeBackend
    path, budget = sys.argv[1], int(sys.argv[2])
    b = NativeBackend(path, n_ctx=256, threads=2, memory_budget=budget if budget else None)
    b.set_sampling(GREEDY)
    out = [b.step([1, 2, 3, 4, 5, 6, 7, 8])]
    for _ in range(11):
        out.append(b.step([out[-1]]))
    print(json.dumps({"tokens": out, "slots": b.plan.slots, "planned": b.plan.total,
                      "rss": psutil.Process().memory_info().rss, "experts": b.plan.experts}))
""")


@pytest.fixture(scope="module")
def random_moe(tmp_path_factory):
    """~215 MB Qwen3-MoE, almost all experts (24 x 8 layers of 0.86 MiB): larger than the process."""
    return write_random_moe_gguf(tmp_path_factory.mktemp("moe-big") / "moe.gguf", n_embd=1024, n_ff=512, n_expert=24,
                                 n_expert_used=4, n_layer=8, n_head=8, n_head_kv=2, head_dim=128)


def test_budget_holds_under_a_memory_cgroup(random_moe, tmp_path):
    from edgeai.devices.cgroup import drop_file_cache, run_limited, unavailable

    why = unavailable()
    if why:
        pytest.skip(f"cannot enforce a memory limit here: {why}")
    path = random_moe
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    free = subprocess.run([sys.executable, str(script), str(path), "0"], capture_output=True, text=True, check=True)
    unlimited = json.loads(free.stdout)
    # budget: everything but a quarter of the experts (well below the file's size)
    budget = unlimited["planned"] - unlimited["experts"] * 3 // 4
    assert budget < os.path.getsize(path)
    drop_file_cache(path)
    r = run_limited([sys.executable, str(script), str(path), str(budget)], budget, timeout=300)
    assert r.returncode == 0 and not r.oom_killed, r.stderr[-2000:]
    limited = json.loads(r.stdout)
    assert 0 < limited["slots"] < 24 * 8 // 4 + 8  # streaming, with about a quarter of the experts cached
    assert limited["tokens"] == unlimited["tokens"]
    assert r.peak <= budget
    assert limited["rss"] <= limited["planned"]  # the process's own memory stayed within the plan


def test_cli_plan_and_budgets_the_other_engines_cannot_keep(random_moe):
    from typer.testing import CliRunner

    from edgeai.cli import app
    from edgeai.runtimes.llamacpp import LlamaCppBackend

    path = random_moe
    runner = CliRunner()
    shown = runner.invoke(app, ["run", str(path), "--plan", "--json", "--ctx", "128"])
    assert shown.exit_code == 0, shown.output
    plan = json.loads(shown.output)
    assert not plan["streaming"] and plan["parts"]["experts"] > 100 << 20
    half = plan["total"] - plan["parts"]["experts"] // 2
    tight = runner.invoke(app, ["run", str(path), "--plan", "--json", "--ctx", "128", "--memory-budget", str(half)])
    assert tight.exit_code == 0, tight.output
    tight = json.loads(tight.output)
    assert tight["streaming"] and tight["total"] <= half and 0.3 < tight["slots"] / (24 * 8) < 0.7
    q8 = json.loads(runner.invoke(app, ["run", str(path), "--plan", "--json", "--ctx", "128", "--memory-budget",
                                        str(half), "--kv-cache", "q8_0"]).output)
    assert q8["kv_cache"] == "q8_0" and q8["parts"]["KV cache"] == tight["parts"]["KV cache"] * 34 // 64
    assert q8["slots"] >= tight["slots"]  # the memory the cache gave back goes to experts
    refused = runner.invoke(app, ["run", str(path), "--plan", "--ctx", "128", "--memory-budget", "20MB"],
                            env={"COLUMNS": "300"})
    assert refused.exit_code == 1 and "needs at least" in refused.output and "raise the budget" in refused.output
    with pytest.raises(BudgetError, match="backend='native'"):
        LlamaCppBackend(path, n_ctx=128, memory_budget=path.stat().st_size - 1)


INTERRUPTED = textwrap.dedent("""
    import json, os, sys
    from edgeai.runtimes.base import GREEDY
    from edgeai.runtimes.native import NativeBackend
    threads = len(os.listdir("/proc/self/task"))
    b = NativeBackend(sys.argv[1], n_ctx=4096, threads=2, expert_store={"slots": 4})
    b.set_sampling(GREEDY)
    token = b.step([1, 2, 3])
    print("ready", flush=True)
    steps = 0
    try:
        while True:  # every step misses the cache: the interrupt lands during reads
            token = b.step([token])
            steps += 1
            if b.n_past > 4000:
                b.truncate(3)
    except KeyboardInterrupt:
        b.close()
        print(json.dumps({"steps": steps, "threads_before": threads, "threads_after": len(os.listdir("/proc/self/task"))}))
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
def test_ctrl_c_during_reads(random_moe, tmp_path):
    import signal
    import time

    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    before = sorted(os.listdir(tmp_path))
    child = subprocess.Popen([sys.executable, str(script), str(random_moe)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-2000:]  # no crash: the interrupt surfaced as KeyboardInterrupt
    report = json.loads(out)
    assert report["threads_after"] == report["threads_before"]  # reader and worker threads joined
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.fixture(scope="module")
def dense_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-stream")
    arch = next(a for a in TINY_ARCHS if a.name == "qwen2")
    return convert(make_tiny_checkpoint(root / "qwen2", arch, num_hidden_layers=8), root / "qwen2.gguf",
                   outtype="q8_0")


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_dense_layers_streamed_when_they_do_not_fit(dense_gguf, moe_ggufs, which):
    """A budget below the dense weights streams each layer's matrices through two slots: same
    logits; the planner picks it only when keeping them resident does not fit."""
    path = dense_gguf if which == "dense" else moe_ggufs["qwen2_moe"]
    ref = NativeBackend(path, n_ctx=128, threads=1)
    ref_logits, ref_tokens = run(ref, 8)
    b = NativeBackend(path, n_ctx=128, threads=1, expert_store={"slots": 0 if which == "dense" else 3, "layer_slots": 2})
    logits, tokens = run(b, 8)
    np.testing.assert_array_equal(logits, ref_logits)
    assert tokens == ref_tokens
    layers = b.stats().extra["expert_store"]["layers"]
    assert layers["misses"] > 0 and layers["bytes_read"] > 0
    b.close()
    if which == "moe":  # 3 layers: two layer slots hold as much as all layers, nothing to plan
        return
    header = read_header(path)
    config = engine_config(header)
    plan = plan_memory(header, config, budget=None, n_ctx=128, threads=1, process_bytes=10 << 20)
    assert plan.layer_matrices > 0
    budget = plan.minimum
    streamed = plan_memory(header, config, budget=budget, n_ctx=128, threads=1, process_bytes=10 << 20)
    assert streamed.layer_slots == 2 and streamed.total <= budget < plan.total
    assert streamed.stream_config().layer_slots == 2
    assert not plan_memory(header, config, budget=plan.total, n_ctx=128, threads=1, process_bytes=10 << 20).streaming
    with pytest.raises(BudgetError):
        plan_memory(header, config, budget=budget - 1, n_ctx=128, threads=1, process_bytes=10 << 20)
