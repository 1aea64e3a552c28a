"""Calibration: activation statistics of a model on a text, for imatrix / AWQ / GPTQ quantization.

    text -> the checkpoint's own tokenizer -> chunks of n_ctx tokens (BOS first, when the model
    adds one) -> reference forward pass (`edgeai.quant.forward`) -> per-weight column statistics

The tokenizer is the one the converted model will use: `tokenizer.json` (the `tokenizers`
library) else `tokenizer.model` (`sentencepiece`) for a Hugging Face folder, llama.cpp's own
(llama-cpp-python, vocabulary only) for a GGUF source. Chunks are cut as llama.cpp's imatrix tool
cuts them; a last partial chunk is dropped.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from edgeai.errors import CalibrationError, OptionError, TokenizerError
from edgeai.quant.forward import ColumnStats, Logits, Observer, StatsCollector, forward

if TYPE_CHECKING:
    from edgeai.converters.plan import ConversionPlan

log = logging.getLogger(__name__)

__all__ = ["ActivationStats", "CalibrationSet", "calibration_chunks", "calibration_set", "collect_statistics", "tokenize"]

DEFAULT_N_CTX = 512
# Hidden states take max_tokens * n_embd * 4 bytes during the pass (128 MiB for n_embd=1024).
DEFAULT_MAX_TOKENS = 32 * 1024


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration text cut into the token chunks every calibrated method runs."""

    chunks: list[np.ndarray]  # each [n_ctx] int64, BOS first when the model adds one
    n_ctx: int
    text_sha256: str  # of the calibration text, UTF-8

    def recipe(self) -> dict[str, object]:
        """What an artifact's recipe records about this calibration."""
        return {"text_sha256": self.text_sha256, "n_ctx": self.n_ctx, "n_chunks": len(self.chunks),
                "n_tokens": self.n_ctx * len(self.chunks)}


@dataclass(frozen=True)
class ActivationStats:
    """Per-weight input statistics of one calibration run, keyed by GGUF weight name.

    Stacked expert weights (`ffn_*_exps`) have one row of statistics per expert, over the tokens
    routed to that expert.
    """

    columns: Mapping[str, ColumnStats]
    calibration: CalibrationSet

    @property
    def n_ctx(self) -> int:
        return self.calibration.n_ctx

    @property
    def n_chunks(self) -> int:
        return len(self.calibration.chunks)

    @property
    def text_sha256(self) -> str:
        return self.calibration.text_sha256

    @property
    def n_tokens(self) -> int:
        """Tokens run through the model."""
        return self.n_ctx * self.n_chunks

    def __contains__(self, weight: str) -> bool:
        return weight in self.columns

    def _stats(self, weight: str) -> ColumnStats:
        try:
            return self.columns[weight]
        except KeyError:
            raise KeyError(f"no activation statistics for {weight!r}; it is not the weight of a linear layer") from None

    def importance(self, weight: str) -> np.ndarray:
        """The imatrix statistic: mean of x^2 per input column, [n_in] ([n_expert, n_in] for experts)."""
        return self._stats(weight).mean_sq()

    def mean_abs(self, weight: str) -> np.ndarray:
        """Mean |x| per input column (AWQ), [n_in] ([n_expert, n_in] for experts)."""
        return self._stats(weight).mean_abs()

    def tokens(self, weight: str) -> int | np.ndarray:
        """Tokens that reached `weight`: an int, or [n_expert] counts for stacked experts."""
        return self._stats(weight).tokens()

    def recipe(self) -> dict[str, object]:
        """What an artifact's recipe records about this calibration."""
        return self.calibration.recipe()


def _metadata(plan: ConversionPlan) -> dict[str, object]:
    return {m.key: m.value for m in plan.kv}


def _bos_token(plan: ConversionPlan) -> int | None:
    """The BOS id when the model starts sequences with it, as llama.cpp decides from the metadata."""
    meta = _metadata(plan)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not
        add_bos = meta.get("tokenizer.ggml.model") == "llama"
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return int(bos) if add_bos and bos is not None else None


def tokenize(plan: ConversionPlan, text: str) -> list[int]:
    """Token ids of `text` by the checkpoint's own tokenizer, without BOS/EOS.

    Special tokens written in the text (chat markup) are tokenized as plain text, as llama.cpp's
    imatrix tool does, so a GGUF source and its Hugging Face folder give the same ids.
    """
    source = Path(plan.source.path)
    if plan.source_format == "gguf":
        from edgeai.runtimes.vocab import GGUFVocab

        vocab = GGUFVocab(source)  # llama.cpp's tokenizer, loaded without weights
        try:
            return vocab.tokenize(text, add_special=False, parse_special=False)
        finally:
            vocab.close()
    if (source / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        tokenizer.encode_special_tokens = True  # "<|im_start|>" in the text is plain text, as for llama.cpp
        return tokenizer.encode(text, add_special_tokens=False).ids
    if (source / "tokenizer.model").is_file():
        import sentencepiece as spm

        return list(spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model")).encode(text))
    raise TokenizerError(f"{source} has no tokenizer.json or tokenizer.model to tokenize the calibration text with")


def calibration_chunks(ids: Sequence[int], n_ctx: int, bos: int | None, max_tokens: int) -> list[np.ndarray]:
    """Cut `ids` into whole chunks of `n_ctx` tokens, each starting with `bos` when given, at most
    `max_tokens` tokens in all. CalibrationError if not even one chunk fills."""
    per_chunk = n_ctx - (bos is not None)  # text tokens per chunk
    if len(ids) < per_chunk:
        raise CalibrationError(
            f"the calibration text is {len(ids)} tokens long, but one chunk of n_ctx={n_ctx} needs {per_chunk}"
            f"{' (plus BOS)' if bos is not None else ''}; give a longer text or a smaller n_ctx"
        )
    n_chunks = min(len(ids) // per_chunk, max_tokens // n_ctx)
    text = np.asarray(ids[: n_chunks * per_chunk], dtype=np.int64).reshape(n_chunks, per_chunk)  # [n_chunks, per_chunk]
    if bos is not None:
        text = np.concatenate([np.full((n_chunks, 1), bos, np.int64), text], axis=1)  # [n_chunks, n_ctx]
    return list(text)


def calibration_set(plan: ConversionPlan, text: str, *, n_ctx: int = DEFAULT_N_CTX,
                    max_tokens: int = DEFAULT_MAX_TOKENS) -> CalibrationSet:
    """Tokenize `text` with the checkpoint's own tokenizer and cut it into chunks of `n_ctx` tokens.

    Raises:
        CalibrationError: the text is shorter than one chunk.
        OptionError: n_ctx or max_tokens cannot be used.
    """
    if n_ctx < 2:
        raise OptionError(f"n_ctx={n_ctx} is too small for calibration; use at least 2 (512 is usual)")
    if max_tokens < n_ctx:
        raise OptionError(f"max_tokens={max_tokens} is less than one chunk of n_ctx={n_ctx}; raise it or lower n_ctx")
    if plan.hparams is not None and n_ctx > plan.hparams.n_ctx_train:
        log.warning("n_ctx=%d is beyond the model's training context (%d)", n_ctx, plan.hparams.n_ctx_train)
    checksum = hashlib.sha256(text.encode("utf-8")).hexdigest()
    ids = tokenize(plan, text)
    bos = _bos_token(plan)
    chunks = calibration_chunks(ids, n_ctx, bos, max_tokens)
    used = len(chunks) * (n_ctx - (bos is not None))
    log.info("calibration: %d tokens in the text, %d chunk(s) of %d used (%d tokens left out)",
             len(ids), len(chunks), n_ctx, len(ids) - used)
    return CalibrationSet(chunks, n_ctx, checksum)


def collect_statistics(
    plan: ConversionPlan,
    text: str,
    *,
    n_ctx: int = DEFAULT_N_CTX,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    observers: Sequence[Observer] = (),
) -> ActivationStats:
    """Run `text` through the model and collect the inputs' statistics of every linear weight.

    Args:
        plan: a planned conversion (`open_plan`) of a model whose architecture has a spec.
        text: calibration text, tokenized with the checkpoint's own tokenizer.
        n_ctx: tokens per chunk; each chunk is attended causally from position 0.
        max_tokens: at most this many tokens are run (whole chunks); the hidden states of all of
            them are held at once (max_tokens * n_embd * 4 bytes).
        observers: more observers for the same pass (e.g. a `RowRecorder` for GPTQ).

    Returns:
        The statistics, with the text's checksum and the chunking used.

    Raises:
        CalibrationError: the text is shorter than one chunk, or the architecture has no spec.
        OptionError: n_ctx or max_tokens cannot be used.
    """
    calib = calibration_set(plan, text, n_ctx=n_ctx, max_tokens=max_tokens)
    collector = StatsCollector()
    forward(plan, calib.chunks, observers=[collector, *observers], logits=Logits.NONE)
    return ActivationStats(collector.columns, calib)
