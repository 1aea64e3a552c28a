"""Does the installed llama.cpp compute on this CPU? Asked once per library build and CPU, in a child.

Some builds of llama.cpp crash the process on some CPUs: a llama-cpp-python compiled with
`-march=native` on a Xeon with AMX puts quantized weights in llama.cpp's AMX buffers and dies with
SIGSEGV in the first decode (llama.cpp issue 20824). `pip install edgeai` builds llama-cpp-python
from source with its own defaults, so edgeai cannot assume the Makefile's build. Before llama.cpp
first computes in this process (a model with weights: the vocabulary-only loads never compute),
a child process loads a small model holding every weight type llama.cpp repacks (Q4_0, Q4_1, Q8_0,
Q4_K, Q5_K, Q6_K), evaluates a batch and a few single tokens, and exits. If it dies, a second child
tries again with llama.cpp's `use_extra_bufts` model parameter off (no AMX or repacked weight
buffers: slower prefill, see README); if that one works, every llama.cpp model of this process is
loaded so, with a warning, else llama.cpp is refused with `BackendError` naming the cause and the fix.

The answer is kept in memory and in a small JSON file under the user's cache folder, keyed by the
llama.cpp library file (path, size, time) and the CPU (model name, ISA features): a rebuild or another
CPU asks again.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgeai.errors import BackendError

log = logging.getLogger(__name__)

# The fix named in every refusal: the project's own build of llama-cpp-python (Makefile, LLAMA_CPP).
REBUILD_HINT = ('rebuild llama-cpp-python for this CPU without AMX: CMAKE_ARGS="-DGGML_NATIVE=ON '
                "-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
                "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" pip install --no-cache-dir "
                "--force-reinstall --no-deps llama-cpp-python (what `make install` does)")
CHILD_TIMEOUT_S = 120.0


class Verdict(str, enum.Enum):
    """What this process does with llama.cpp."""

    WORKS = "works"  # as built
    NO_EXTRA_BUFTS = "no-extra-bufts"  # only with use_extra_bufts off
    BROKEN = "broken"  # not at all


@dataclasses.dataclass(frozen=True)
class CheckResult:
    verdict: Verdict
    detail: str  # what the children said: empty when the first worked
    system_info: str  # llama.cpp's own list of its compiled features


_lock = threading.Lock()
_result: CheckResult | None = None


def _library_file() -> Path:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libllama.so", "libllama.dylib", "llama.dll"):
        if (lib / name).exists():
            return lib / name
    return Path(llama_cpp.__file__)


def _key() -> str:
    lib = _library_file()
    st = lib.stat()
    from edgeai.devices.detect import cpu_name, isa_features

    text = f"{lib}|{st.st_size}|{st.st_mtime_ns}|{cpu_name()}|{','.join(isa_features())}|{sys.version_info[:2]}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "edgeai" / "llamacpp-check.json"


def system_info() -> str:
    """llama.cpp's `llama_print_system_info()`: the features it was compiled with, e.g. "AVX512 = 1"."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


def compiled_features(info: str | None = None) -> dict[str, str]:
    """{feature: value} from llama.cpp's system info, e.g. {"AVX2": "1", "AMX_INT8": "1", "REPACK": "1"}."""
    found: dict[str, str] = {}
    for part in (info if info is not None else system_info()).split("|"):
        key, sep, value = part.partition("=")
        key = key.split(":")[-1].strip()  # "CPU : SSE3" -> "SSE3"
        if sep and key:
            found[key] = value.strip()
    return found


# ISA features as `devices.detect.isa_features` names them -> llama.cpp's system-info name for the same
LLAMA_FEATURE_OF_ISA = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx_vnni": "AVX_VNNI", "avx512f": "AVX512",
                        "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
                        "amx_int8": "AMX_INT8", "neon": "NEON", "dotprod": "DOTPROD", "i8mm": "MATMUL_INT8",
                        "sve": "SVE", "sme": "SME"}


def isa_use(isa: tuple[str, ...] | list[str], info: str | None = None) -> dict[str, bool]:
    """For each of the CPU's `isa` features that llama.cpp has kernels for: whether this build uses it."""
    have = compiled_features(info)
    return {f: have.get(LLAMA_FEATURE_OF_ISA[f]) == "1" for f in isa if f in LLAMA_FEATURE_OF_ISA}


def _run_child(extra_bufts: bool, command: list[str] | None = None) -> tuple[bool, str]:
    """(worked, what went wrong) of one child process."""
    cmd = command or [sys.executable, "-m", "edgeai.runtimes.llamacpp_check"]
    if not extra_bufts:
        cmd = [*cmd, "--no-extra-bufts"]
    # -m puts the working folder first on sys.path: the child starts in the folder that holds the
    # package this module belongs to (site-packages/edgeai/runtimes/ -> site-packages)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        return False, f"timed out after {CHILD_TIMEOUT_S:.0f} s"
    if done.returncode == 0:
        return True, ""
    if done.returncode < 0:
        import signal

        try:
            how = f"killed by {signal.Signals(-done.returncode).name}"
        except ValueError:
            how = f"killed by signal {-done.returncode}"
    else:
        how = f"exit status {done.returncode}"
    tail = " ".join(done.stderr.strip().splitlines()[-3:])
    return False, how + (f": {tail}" if tail else "")


def check(*, command: list[str] | None = None, use_cache: bool = True) -> CheckResult:
    """Whether llama.cpp computes on this CPU (see the module docstring); cached per build and CPU.

    `command` replaces the child's command line (tests give one that crashes)."""
    global _result
    with _lock:
        if _result is not None and use_cache and command is None:
            return _result
        key = _key()
        cache = _cache_file()
        if use_cache and command is None:
            try:
                saved = json.loads(cache.read_text())
                if saved.get("key") == key:
                    _result = CheckResult(Verdict(saved["verdict"]), saved["detail"], saved["system_info"])
                    return _result
            except (OSError, ValueError, KeyError):
                pass
        info = system_info()
        ok, why = _run_child(True, command)
        if ok:
            result = CheckResult(Verdict.WORKS, "", info)
        else:
            ok2, why2 = _run_child(False, command)
            result = CheckResult(Verdict.NO_EXTRA_BUFTS if ok2 else Verdict.BROKEN,
                                 f"as built: {why}" + ("" if ok2 else f"; without extra buffer types: {why2}"), info)
        if command is None:
            _result = result
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + f".{os.getpid()}")
                tmp.write_text(json.dumps({"key": key, **dataclasses.asdict(result), "verdict": result.verdict.value}))
                tmp.replace(cache)
            except OSError as exc:
                log.debug("could not keep the llama.cpp check in %s: %s", cache, exc)
        return result


def model_params(ll=None):
    """llama.cpp's default model parameters for this machine: CPU only, and `use_extra_bufts` off where
    only that works. Raises BackendError where llama.cpp cannot compute here at all."""
    if ll is None:
        from edgeai.runtimes.vocab import llama_cpp

        ll = llama_cpp()
    result = check()
    if result.verdict is Verdict.BROKEN:
        raise BackendError(f"llama.cpp crashes on this CPU ({result.detail}); llama.cpp reports "
                           f"[{result.system_info.strip()}]. To fix it, {REBUILD_HINT}")
    params = ll.llama_model_default_params()
    params.n_gpu_layers = 0
    if result.verdict is Verdict.NO_EXTRA_BUFTS:
        log.warning("llama.cpp as built crashes on this CPU (%s); its weights are loaded without AMX or repacked "
                    "buffers, which slows its prompt processing. To fix it, %s", result.detail, REBUILD_HINT)
        params.use_extra_bufts = False
    return params


# -- the child -----------------------------------------------------------------------------------

def _write_probe_model(path: Path) -> None:
    """A 2-layer Llama GGUF (hidden 256, FFN 512, 4 heads, a 320-token SentencePiece-style vocabulary)
    whose matrices use every type llama.cpp repacks, so that its AMX and repack paths all run."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFValueType as V

    from edgeai.gguf_writer import GGUFWriter
    from edgeai.quant.formats import FORMATS, quantize

    rng = np.random.default_rng(0)
    n_embd, n_ff, n_head, n_layer = 256, 512, 4, 2
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(320 - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (320 - 259)  # unknown, control, control, byte..., normal
    n_vocab = len(tokens)
    matrices = [("token_embd.weight", n_vocab, n_embd, "q8_0"), ("output.weight", n_vocab, n_embd, "q4_0")]
    layer_types = {"attn_q": "q4_0", "attn_k": "q4_1", "attn_v": "q8_0", "attn_output": "q4_k",
                   "ffn_gate": "q5_k", "ffn_up": "q6_k", "ffn_down": "q4_0"}
    for i in range(n_layer):
        for name, kind in layer_types.items():
            rows, cols = (n_embd, n_ff) if name == "ffn_down" else (n_ff, n_embd) if name.startswith("ffn") else (n_embd, n_embd)
            matrices.append((f"blk.{i}.{name}.weight", rows, cols, kind))
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(n_layer) for n in ("attn_norm", "ffn_norm")]
    data = {name: quantize(rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols), FORMATS[kind])
            for name, rows, cols, kind in matrices}
    with open(path, "wb") as out:
        w = GGUFWriter(out)
        w.add("general.architecture", "llama")
        for key, value in (("context_length", 256), ("embedding_length", n_embd), ("block_count", n_layer),
                           ("feed_forward_length", n_ff), ("attention.head_count", n_head),
                           ("attention.head_count_kv", n_head), ("rope.dimension_count", n_embd // n_head)):
            w.add(f"llama.{key}", value, V.UINT32)
        w.add("llama.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32)
        w.add("tokenizer.ggml.model", "llama")
        w.add("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING)
        w.add("tokenizer.ggml.scores", [0.0] * n_vocab, V.ARRAY, V.FLOAT32)
        w.add("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)
        for key, value in (("unknown_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
            w.add(f"tokenizer.ggml.{key}", value, V.UINT32)
        for name, rows, cols, kind in matrices:
            w.add_tensor(name, (rows, cols), FORMATS[kind].ggml_type, data[name].nbytes)
        for name in norms:
            w.add_tensor(name, (n_embd,), T.F32, n_embd * 4)
        w.write_header()
        for name, *_ in matrices:
            w.write_tensor(name, data[name])
        for name in norms:
            w.write_tensor(name, np.ones(n_embd, np.float32))
        w.finish()


def _child(extra_bufts: bool) -> None:
    """Load the probe model and evaluate a batch of 64 tokens, then 4 single tokens; exit 1 on an error
    llama.cpp reports (a crash ends the process by itself)."""
    from edgeai.runtimes.vocab import llama_cpp

    ll = llama_cpp()
    with tempfile.TemporaryDirectory(prefix="edgeai-llamacpp-check-") as tmp:
        path = Path(tmp) / "probe.gguf"
        _write_probe_model(path)
        params = ll.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = extra_bufts
        model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            sys.exit("llama.cpp could not load the probe model")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 128
        cparams.n_threads = cparams.n_threads_batch = min(2, os.cpu_count() or 1)
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            sys.exit("llama.cpp could not make a context for the probe model")
        batch = ll.llama_batch_init(64, 0, 1)
        n_past = 0
        for tokens in ([10 + i for i in range(64)], [300], [301], [302], [303]):
            batch.n_tokens = len(tokens)
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, n_past + i, 1, i == len(tokens) - 1
                batch.seq_id[i][0] = 0
            if ll.llama_decode(ctx, batch) != 0:
                sys.exit(f"llama_decode failed at position {n_past}")
            n_past += len(tokens)
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(320,))
            if not np.isfinite(logits).all():
                sys.exit(f"llama.cpp computed non-finite logits at position {n_past}")
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)


if __name__ == "__main__":
    _child(extra_bufts="--no-extra-bufts" not in sys.argv[1:])
