"""How much a quantized artifact lost: perplexity, KL divergence and top-1 agreement against a reference.

The logits come from llama.cpp (through llama-cpp-python), not from edgeai's own runtime, so the
numbers cannot share a bug with what they measure. `backend="native"` runs the artifact in edgeai's
engine instead, with a KV cache type of its choice (`kv_cache="q4_0"`): what the engine's own
choices cost, against the same llama.cpp reference (whose KV cache stays F32). A Hugging Face reference folder is first
converted to an F32 GGUF so that both sides run in the same engine. The scoring is llama-perplexity's:

    tokens   = tokenize(text)                        the artifact's tokenizer, BOS if the model adds one
    chunk c  = tokens[c*n_ctx : (c+1)*n_ctx]         first token replaced by BOS if the model adds one
    scored   = positions j in [n_ctx/2, n_ctx-1)     logits[j] predicts chunk[j+1], so every scored
                                                     token has at least n_ctx/2 tokens of context
    ppl      = exp(mean over scored positions of -log_softmax(logits[j])[chunk[j+1]])
    kld      = sum_v p_ref(v) * (log p_ref(v) - log p_artifact(v))   per scored position, float64

Both models are loaded at once and evaluated chunk by chunk; only per-position numbers (NLL, KLD,
argmax) are kept, never the logits of the whole text. Peak memory is therefore both models plus,
per model, two n_ctx x n_vocab float32 logit buffers (llama.cpp's and the copy scored here), plus
float64 temporaries for _ROW_BLOCK rows.

Another engine (ONNX later) plugs in as a `LogitsProvider`: `tokenize`, `logits(tokens)`, the
vocabulary size and the BOS token that starts every chunk.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from edgeai.errors import CheckpointError, OptionError

log = logging.getLogger(__name__)

# Scored rows whose float64 log-softmax is computed at once: bounds the temporaries to
# about _ROW_BLOCK * n_vocab * 8 bytes per array (64 rows of a 152k vocabulary: 78 MB).
_ROW_BLOCK = 64
_MIN_CTX = 4  # n_ctx/2 tokens of context plus at least one scored token


@dataclass(frozen=True)
class EvalResult:
    """What `evaluate` measured; `to_json()` gives it as a JSON-ready dict."""

    ppl: float  # perplexity of the artifact on the scored tokens
    ref_ppl: float  # perplexity of the reference on the same tokens
    kld_mean: float  # KL(reference || artifact) per scored position, in nats
    kld_median: float
    kld_p99: float
    top1: float  # fraction of scored positions where both models' argmax agree
    size_bytes: int  # size of the artifact file
    bpw: float  # bits per weight of the artifact's tensor data (header sizes / element counts)
    n_tokens: int  # scored positions
    n_chunks: int
    n_ctx: int
    artifact: str
    reference: str

    def to_json(self) -> dict[str, float | int | str]:
        """Every field as a plain JSON value (`json.dumps(result.to_json())`)."""
        return asdict(self)


class LogitsProvider(Protocol):
    """One model in one engine, as the evaluator needs it."""

    path: Path
    n_vocab: int
    bos_token: int | None  # the token every chunk starts with; None when the model adds no BOS

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as the model's tokenizer gives them (BOS included if the model adds one;
        special-token markup in the text is tokenized as plain text)."""
        ...

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of `tokens` from an empty context: [len(tokens), n_vocab] float32.
        The array may be reused by the next call."""
        ...

    def close(self) -> None: ...


class LlamaCppLogits:
    """A GGUF file run by llama.cpp (the llama.cpp backend) with every position's logits kept.

    The KV cache is F32 unless `kv_cache` names another (llama.cpp's default is F16, which alone
    moves logits by ~1e-3): the evaluation measures the artifact's weights, not the cache's precision.
    """

    def __init__(self, path: Path, *, n_ctx: int, threads: int = 0, kv_cache: str | None = None):
        from edgeai.runtimes.llamacpp import KVType, LlamaCppBackend

        self.path = Path(path)
        # flash attention off as before, unless a quantized V cache needs it (the backend turns it on)
        cache = dict(kv_type=KVType.F32, flash_attn=False) if kv_cache is None else dict(kv_cache=kv_cache)
        self._backend = LlamaCppBackend(self.path, n_ctx=n_ctx, threads=threads or os.cpu_count() or 1, n_batch=n_ctx,
                                        **cache)
        self.n_vocab = self._backend.n_vocab
        self.bos_token = self._backend.bos_id if self._backend.add_bos else None
        self._out: np.ndarray | None = None

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization, as llama-perplexity calls it (add special tokens, parse none)."""
        return self._backend.tokenize(text, add_special=True, parse_special=False)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """One decode of `tokens` from an empty KV cache, into a buffer reused by the next call."""
        self._out = self._backend.all_logits(tokens, out=self._out)
        return self._out

    def close(self) -> None:
        self._backend.close()


# engines an artifact can be scored in (the reference is always scored in llama.cpp)
EVAL_BACKENDS = ("llama.cpp", "native")


def open_logits_provider(path: Path, *, n_ctx: int, threads: int = 0, backend: str = "llama.cpp",
                         kv_cache: str | None = None) -> LogitsProvider:
    """The provider for an artifact's engine: llama.cpp (or, backend="native", edgeai's engine) for a
    .gguf file, onnxruntime for an ONNX folder. kv_cache: the KV cache type of a GGUF's engine
    (`runtimes.base.kv_cache_type`; None: F32 in llama.cpp, f16 in the native engine)."""
    path = Path(path)
    if backend not in EVAL_BACKENDS:
        raise OptionError(f"backend {backend!r} is not one of {', '.join(EVAL_BACKENDS)} (--backend)")
    if path.is_file() and path.suffix.lower() == ".gguf":
        if backend == "native":
            from edgeai.runtimes.native import NativeLogits

            return NativeLogits(path, n_ctx=n_ctx, threads=threads, kv_cache=kv_cache)
        return LlamaCppLogits(path, n_ctx=n_ctx, threads=threads, kv_cache=kv_cache)
    if _is_onnx(path):
        if backend != "llama.cpp" or kv_cache is not None:
            raise OptionError(f"{path} is an ONNX folder: onnxruntime scores it, in the graph's own KV cache type "
                              "(--backend and --kv-cache are for .gguf files)")
        from edgeai.runtimes.onnxrt import OnnxLogits

        return OnnxLogits(path, n_ctx=n_ctx, threads=threads)
    raise OptionError(f"{path} is neither a .gguf file nor an ONNX folder (model.onnx); it cannot be evaluated")


def _is_onnx(path: Path) -> bool:
    return (path.is_dir() and (path / "model.onnx").is_file()) or (path.is_file() and path.suffix.lower() == ".onnx")


def artifact_size(path: Path) -> tuple[int, float]:
    """(size in bytes, bits per weight) of a GGUF file or an ONNX folder."""
    if _is_onnx(Path(path)):
        from edgeai.runtimes.onnxrt import onnx_size

        return onnx_size(Path(path))
    return gguf_size(Path(path))


def gguf_size(path: Path) -> tuple[int, float]:
    """(file size in bytes, bits per weight of the tensor data) of a GGUF file, from its header."""
    from edgeai.gguf_header import read_header

    header = read_header(path)
    n_bytes = sum(t.nbytes for t in header.tensors.values())
    n_weights = sum(t.n_elements for t in header.tensors.values())
    return header.size, 8.0 * n_bytes / max(1, n_weights)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class _Scores:
    """Per-scored-position numbers, gathered chunk by chunk."""

    nll: list[np.ndarray]
    ref_nll: list[np.ndarray]
    kld: list[np.ndarray]
    same_top1: list[np.ndarray]

    def add(self, logits: np.ndarray, ref_logits: np.ndarray, targets: np.ndarray) -> None:
        """Score rows of logits ([n, n_vocab], row i predicts targets[i]) in blocks of _ROW_BLOCK rows."""
        for start in range(0, len(targets), _ROW_BLOCK):
            rows = slice(start, start + _ROW_BLOCK)
            target = targets[rows]
            logp = _log_softmax(logits[rows])
            ref_logp = _log_softmax(ref_logits[rows])
            picked = np.arange(len(target))
            self.nll.append(-logp[picked, target])
            self.ref_nll.append(-ref_logp[picked, target])
            self.kld.append(np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1))
            self.same_top1.append(np.argmax(logits[rows], axis=-1) == np.argmax(ref_logits[rows], axis=-1))


def _check_same_vocabulary(model: LogitsProvider, ref: LogitsProvider, text: str, text_path: Path,
                           tokens: list[int]) -> None:
    """Same vocabulary size, same tokens for this text and the same BOS rule, or OptionError."""
    if model.n_vocab != ref.n_vocab:
        raise OptionError(
            f"the vocabularies differ: {model.path} has {model.n_vocab} tokens, the reference {ref.path} has "
            f"{ref.n_vocab}; compare an artifact with the model it was made from"
        )
    ref_tokens = ref.tokenize(text)
    if ref_tokens != tokens or ref.bos_token != model.bos_token:
        where = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
        raise OptionError(
            f"the vocabularies differ: {model.path} and the reference {ref.path} tokenize {text_path} differently "
            f"({len(tokens)} vs {len(ref_tokens)} tokens, first difference at token {where}, BOS {model.bos_token} vs "
            f"{ref.bos_token}); compare an artifact with the model it was made from"
        )


def eval(  # noqa: A001 - `edgeai eval`'s function, named as the command; `evaluate` is the same function
    artifact: str | Path,
    reference: str | Path,
    text: str | Path,
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
    backend: str = "llama.cpp",
    kv_cache: str | None = None,
) -> EvalResult:
    """Perplexity of `artifact` and its KL divergence from `reference` on a text, llama-perplexity style.

    Args:
        artifact: the GGUF file or ONNX folder to judge (logits from llama.cpp or onnxruntime).
        reference: the model it should match: an F16/F32 GGUF, or a Hugging Face checkpoint folder
            (converted to an F32 GGUF in a temporary directory first; TMPDIR chooses where).
        text: a UTF-8 text file; it is tokenized once with the artifact's tokenizer.
        n_ctx: tokens per chunk; the second half of each chunk is scored.
        n_chunks: evaluate only the first n_chunks chunks (None: every whole chunk of the text).
        threads: llama.cpp threads; 0 uses every core.
        progress: called as progress(chunks_done, n_chunks) after each chunk.
        backend: the engine that scores a GGUF artifact, "llama.cpp" or "native" (edgeai's).
        kv_cache: the artifact's KV cache type ("f16", "q8_0", "q4_0", "q8_0/q4_0", ...; None: F32 in
            llama.cpp, f16 in the native engine). The reference keeps an F32 cache.

    Returns:
        An EvalResult. KL divergence is KL(reference || artifact) in nats per scored token.

    Raises:
        OptionError: a path does not exist, the text is too short for one chunk, the vocabularies
            differ, or an option is out of range.
    """
    artifact, reference, text_path = Path(artifact), Path(reference), Path(text)
    for what, path in (("artifact", artifact), ("reference", reference), ("text file", text_path)):
        if not path.exists():
            raise OptionError(f"the {what} {path} does not exist")
    from edgeai.options import checked_int

    # each chunk holds two n_ctx x n_vocab float32 logit buffers (module docstring): 2^20 tokens of a
    # 32k vocabulary would be 256 GiB; the model's own context bounds it further when it loads
    checked_int("n_ctx (--n-ctx)", n_ctx, minimum=_MIN_CTX, maximum=2**20,
                why="tokens per chunk: half for context, half scored")
    if n_chunks is not None:
        checked_int("n_chunks (--n-chunks)", n_chunks, minimum=1)
    checked_int("threads (--threads)", threads, minimum=0, why="0 uses every core")
    try:
        text_str = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"cannot read the text file {text_path} as UTF-8: {exc}") from exc

    with contextlib.ExitStack() as stack:
        model = open_logits_provider(artifact, n_ctx=n_ctx, threads=threads, backend=backend, kv_cache=kv_cache)
        stack.callback(model.close)
        tokens = model.tokenize(text_str)
        n_chunks_max = len(tokens) // n_ctx
        if n_chunks_max == 0:
            raise OptionError(
                f"the text file {text_path} is too short: {len(tokens)} tokens with the tokenizer of {artifact.name}, "
                f"one chunk needs n_ctx = {n_ctx}; give a longer text or a smaller --ctx"
            )
        if n_chunks is not None and n_chunks > n_chunks_max:
            log.warning("%s holds only %d chunks of %d tokens; evaluating those", text_path, n_chunks_max, n_ctx)
        n_chunks = n_chunks_max if n_chunks is None else min(n_chunks, n_chunks_max)

        ref_path = _reference_gguf(reference, stack)
        ref = open_logits_provider(ref_path, n_ctx=n_ctx, threads=threads)
        stack.callback(ref.close)
        _check_same_vocabulary(model, ref, text_str, text_path, tokens)
        _, ref_bpw = gguf_size(ref_path)
        if ref_bpw < 16.0:  # below F16: the reference itself is quantized
            log.warning("the reference %s has %.2f bits per weight; KL divergence is measured against a "
                        "quantized model", ref_path, ref_bpw)

        first = n_ctx // 2
        scores = _Scores([], [], [], [])
        log.info("evaluating %s against %s: %d chunks of %d tokens", artifact, reference, n_chunks, n_ctx)
        for c in range(n_chunks):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
            if model.bos_token is not None:
                chunk[0] = model.bos_token
            targets = np.asarray(chunk[first + 1:], dtype=np.int64)
            logits = model.logits(chunk)[first:n_ctx - 1]
            ref_logits = ref.logits(chunk)[first:n_ctx - 1]
            scores.add(logits, ref_logits, targets)
            if progress is not None:
                progress(c + 1, n_chunks)

    nll, ref_nll, kld = (np.concatenate(x) for x in (scores.nll, scores.ref_nll, scores.kld))
    size_bytes, bpw = artifact_size(artifact)
    result = EvalResult(
        ppl=math.exp(float(nll.mean())),
        ref_ppl=math.exp(float(ref_nll.mean())),
        kld_mean=float(kld.mean()),
        kld_median=float(np.median(kld)),
        kld_p99=float(np.percentile(kld, 99)),
        top1=float(np.concatenate(scores.same_top1).mean()),
        size_bytes=size_bytes,
        bpw=bpw,
        n_tokens=len(nll),
        n_chunks=n_chunks,
        n_ctx=n_ctx,
        artifact=str(artifact),
        reference=str(reference),
    )
    log.info("%s: ppl %.4f (reference %.4f), KLD mean %.6f, top-1 %.2f%%", artifact, result.ppl, result.ref_ppl,
             result.kld_mean, 100 * result.top1)
    return result


evaluate = eval  # the name it had before `edgeai eval` and its function shared one


def _reference_gguf(reference: Path, stack: contextlib.ExitStack) -> Path:
    """The reference as a GGUF file: itself, or a Hugging Face folder converted to F32 in a temporary
    directory that `stack` removes."""
    if not reference.is_dir():
        return reference
    from edgeai.converters.convert import convert

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgeai-eval-")))
    log.info("converting the reference %s to F32 in %s", reference, tmp)
    return convert(reference, tmp / "reference-f32.gguf", outtype="f32")
