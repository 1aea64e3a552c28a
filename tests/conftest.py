import signal
import sys
from pathlib import Path

import pytest

# Test helpers live beside the tests (tests/helpers.py), not in the package.
sys.path.insert(0, str(Path(__file__).parent))

# Tests send Ctrl-C (SIGINT) to child processes. A shell without job control starts background
# commands with SIGINT ignored, and children inherit that: Python then never raises KeyboardInterrupt
# and those tests would hang. With a handler here (not SIG_IGN), children start with the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionstart(session):
    """Stop at once, saying why, where the installed llama.cpp crashes on this CPU: most tests load it
    in this process, and a crash there would end pytest with a bare segmentation fault."""
    from edgeai.runtimes import llamacpp_check as lc

    result = lc.check()
    if result.verdict is not lc.Verdict.WORKS:
        pytest.exit(f"llama.cpp does not compute on this CPU as built ({result.detail}); it reports "
                    f"[{result.system_info.strip()}]. To fix it, {lc.REBUILD_HINT}", returncode=1)


@pytest.fixture(scope="session")
def tiny_chat_gguf(tmp_path_factory):
    """A tiny random SmolLM-style model with a ChatML template, as an F32 GGUF (llama.cpp, native)."""
    import edgeai
    from helpers import TINY_ARCHS, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_chat")
    folder = make_tiny_checkpoint(root / "hf", next(a for a in TINY_ARCHS if a.name == "smollm"))
    return edgeai.convert(folder, root / "tiny-f32.gguf", outtype="f32")


@pytest.fixture(scope="session")
def tiny_chat_onnx(tiny_chat_gguf):
    """The same tiny chat model (the checkpoint beside tiny_chat_gguf) as an fp32 ONNX folder (onnxruntime)."""
    import edgeai

    return edgeai.convert(tiny_chat_gguf.parent / "hf", tiny_chat_gguf.parent / "tiny-fp32-onnx", format="onnx",
                          quant="fp32")
