"""The llama.cpp this project installs: it computes on this machine's CPU, it was built with the ISA
features the Makefile chose (this CPU's, AMX excepted), and a llama.cpp that crashes is caught in a
child process, worked around or refused with a message, never taking the process down."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeai.devices.detect import isa_features
from edgeai.errors import BackendError
from edgeai.runtimes import llamacpp_check as lc

CRASH = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def test_llama_cpp_decodes_in_a_child_process_on_this_cpu():
    """The check's child loads a model of every repacked weight type and decodes: on a CPU where
    llama.cpp crashes this fails here, with the signal and llama.cpp's features, not a dead pytest."""
    result = lc.check(use_cache=False)
    assert result.verdict is lc.Verdict.WORKS, (
        f"llama.cpp does not compute on this CPU ({result.detail}); it reports [{result.system_info.strip()}]; "
        f"{lc.REBUILD_HINT}")


def test_llama_cpp_reports_the_features_the_install_chose():
    """The Makefile builds llama.cpp for this CPU without AMX: every feature of this CPU that llama.cpp
    has kernels for is compiled in, AMX is not. A cached wheel from another CPU or a build that
    brings AMX back (the crash) fails here."""
    isa = isa_features()
    info = lc.system_info()
    use = lc.isa_use(isa, info)
    missing = [f for f, on in use.items() if not on and not f.startswith("amx")]
    assert not missing, f"llama.cpp was built without this CPU's {missing}: [{info.strip()}] (a wheel built elsewhere?)"
    assert lc.compiled_features(info).get("AMX_INT8") != "1", f"llama.cpp was built with AMX: [{info.strip()}]"
    if sys.platform == "linux" and "avx2" in isa:
        assert use["avx2"]


def test_feature_list_parsing():
    info = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | "
    assert lc.compiled_features(info) == {"SSE3": "1", "AVX2": "1", "AVX512": "1", "AMX_INT8": "1", "REPACK": "1"}
    assert lc.isa_use(("avx2", "avx512f", "avx512_vnni", "sha"), info) == {"avx2": True, "avx512f": True,
                                                                           "avx512_vnni": False}


def test_a_crash_is_retried_without_extra_buffers_then_refused():
    only_plain = [sys.executable, "-c", f"import sys\nif '--no-extra-bufts' not in sys.argv: {CRASH}"]
    result = lc.check(command=only_plain)
    assert result.verdict is lc.Verdict.NO_EXTRA_BUFTS and "SIGSEGV" in result.detail
    result = lc.check(command=[sys.executable, "-c", CRASH])
    assert result.verdict is lc.Verdict.BROKEN and result.detail.count("SIGSEGV") == 2
    failing = lc.check(command=[sys.executable, "-c", "import sys; sys.exit('no model for you')"])
    assert failing.verdict is lc.Verdict.BROKEN and "no model for you" in failing.detail


@pytest.fixture
def verdict(monkeypatch):
    """Set this process's answer of the check (as if the child had said so)."""
    def set_verdict(v: lc.Verdict):
        monkeypatch.setattr(lc, "_result", lc.CheckResult(v, "as built: killed by SIGSEGV", lc.system_info()))
    return set_verdict


def test_backends_refuse_a_llama_cpp_that_crashes_here(tiny_chat_gguf, verdict):
    from edgeai.evaluate import LlamaCppLogits
    from edgeai.runtimes.llamacpp import LlamaCppBackend

    verdict(lc.Verdict.BROKEN)
    for load in (lambda: LlamaCppBackend(tiny_chat_gguf), lambda: LlamaCppLogits(tiny_chat_gguf, n_ctx=32)):
        with pytest.raises(BackendError, match="crashes on this CPU.*SIGSEGV.*GGML_NATIVE=ON.*-mno-amx-int8"):
            load()


def test_without_extra_buffers_llama_cpp_still_computes_the_same(tiny_chat_gguf, verdict, caplog):
    from edgeai.runtimes.llamacpp import LlamaCppBackend

    tokens = list(range(5, 40))
    plain = LlamaCppBackend(tiny_chat_gguf, n_ctx=64)
    want = plain.all_logits(tokens)
    plain.close()
    verdict(lc.Verdict.NO_EXTRA_BUFTS)
    with caplog.at_level(logging.WARNING, logger="edgeai.runtimes.llamacpp_check"):
        backend = LlamaCppBackend(tiny_chat_gguf, n_ctx=64)
    assert "without AMX or repacked buffers" in caplog.text
    got = backend.all_logits(tokens)
    backend.close()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_suite_stops_with_the_reason_where_llama_cpp_crashes(tmp_path):
    """conftest.py asks the check before any test: a llama.cpp that crashes here (as the cached answer
    says) ends pytest at once with the cause and the fix, not a segmentation fault mid-suite."""
    cache = tmp_path / "edgeai" / "llamacpp-check.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({"key": lc._key(), "verdict": "broken", "detail": "as built: killed by SIGSEGV",
                                 "system_info": "CPU : AMX_INT8 = 1 |"}))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    tests = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{Path(__file__)}::test_feature_list_parsing"], cwd=tests, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "llama.cpp does not compute on this CPU as built (as built: killed by SIGSEGV)" in done.stdout + done.stderr
    assert "-mno-amx-int8" in done.stdout + done.stderr
