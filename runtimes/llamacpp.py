"""The llama.cpp backend: a GGUF run by llama.cpp through llama-cpp-python's low-level (C) API.

llama.cpp computes logits; the token is chosen by the shared numpy sampler (`runtimes.sampling`),
so this backend samples exactly as the others do. One sequence (seq_id 0) per backend; the KV
cache is truncated in place (`llama_memory_seq_rm`) for prompt-prefix reuse.
"""

from __future__ import annotations

import ctypes
import enum
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeai.budget import format_bytes
from edgeai.devices import checked_threads
from edgeai.errors import BackendError, BudgetError, CheckpointError, ContextOverflowError, OptionError
from edgeai.runtimes.base import DEFAULT_N_CTX, BackendStats, Sampling, kv_cache_type, kv_cache_types
from edgeai.runtimes.llamacpp_check import model_params
from edgeai.runtimes.sampling import make_rng, sample
from edgeai.runtimes.vocab import GGUFVocab, VocabText, check_vocabulary, llama_cpp

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


class KVType(enum.Enum):
    """Element type of llama.cpp's KV cache (its GGML type id)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8


# Bytes per cached value of each type (ggml's blocks: 32 values in 34 bytes for Q8_0, 18 for Q4_0).
_KV_ELEMENT_BYTES = {KVType.F32: 4, KVType.F16: 2, KVType.Q8_0: 34 / 32, KVType.Q4_0: 18 / 32}


class LlamaCppBackend(VocabText):
    """A GGUF in llama.cpp: one model, one context, one sequence (see `runtimes.base.Backend`)."""

    name = "llama.cpp"
    can_evict = True
    can_compact = False  # llama.cpp's cache drops and shifts whole positions for every layer and head
    n_seq = 1  # one sequence: requests run one at a time

    @classmethod
    def can_run(cls, path: Path, header=None) -> str | None:
        """None when llama.cpp can try this file, else why not (it must be a GGUF file). header: unused
        (llama.cpp reads the file itself), taken as every backend takes it."""
        path = Path(path)
        if not path.exists():
            return f"{path} does not exist"
        if path.is_dir():
            return f"{path} is a folder; llama.cpp runs .gguf files"
        with open(path, "rb") as f:
            head = f.read(4)
        if head != GGUF_MAGIC:
            return f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})"
        return None

    def __init__(self, path: Path, *, n_ctx: int | None = None, threads: int | None = None,
                 memory_budget: int | None = None, kv_cache: str | None = None, kv_type: KVType = KVType.F16,
                 n_batch: int = 512, flash_attn: bool | None = None, header=None) -> None:
        """kv_cache: "f16", "q8_0", "q4_0" or keys/values such as "q8_0/q4_0"
        (`runtimes.base.kv_cache_type`), the API's name for `kv_type` (llama.cpp's type_k and type_v);
        `kv_type` F32 makes logits comparable to a float reference. `flash_attn` None lets llama.cpp
        decide (its own default: on for CPUs), False matches llama-cpp-python's `Llama` default; a
        quantized V cache needs flash attention in llama.cpp, so it is turned on for one (quantized
        keys alone do not need it)."""
        kv_types = (kv_type, kv_type)
        if kv_cache is not None:
            kv_types = tuple(KVType[t.upper()] for t in kv_cache_types(kv_cache_type(kv_cache)))
        if kv_types[1] in (KVType.Q8_0, KVType.Q4_0):
            if flash_attn is False:
                raise OptionError(f"llama.cpp needs flash attention for a {kv_types[1].name.lower()} V cache "
                                  "(flash_attn=False was given)")
            flash_attn = True
        self.path = Path(path)
        reason = self.can_run(self.path)
        if reason:
            raise CheckpointError(reason)
        ll = llama_cpp()
        self._ll = ll
        self._model = self._ctx = self._batch = None
        self.threads = checked_threads(threads)
        self.memory_budget = memory_budget
        size = self.path.stat().st_size
        if memory_budget is not None and size > memory_budget:
            # llama.cpp maps the whole file and leaves paging to the kernel: it has no way to stay
            # within a budget smaller than the weights, so refuse instead of thrashing the disk
            raise BudgetError(f"{self.path.name} is {format_bytes(size)}, more than the memory budget of "
                              f"{format_bytes(memory_budget)}; llama.cpp keeps every weight mapped. The native backend "
                              "streams MoE experts within a budget (backend='native', `edgeai run --plan` shows the split)",
                              size)

        if header is None:  # read by the caller: the reader refused a bad vocabulary then
            check_vocabulary(self.path)
        self._model = ll.llama_model_load_from_file(str(self.path).encode(), model_params(ll))
        if not self._model:
            raise CheckpointError(f"llama.cpp could not load {self.path}: a corrupt file or an architecture or "
                                  "tensor type this llama.cpp build does not know (run with -v for its log)")
        try:
            self._vocab = GGUFVocab(self.path, model=self._model)
            self.n_ctx_train = int(ll.llama_model_n_ctx_train(self._model))
            from edgeai.options import checked_int

            n_ctx = min(DEFAULT_N_CTX, self.n_ctx_train) if n_ctx is None else \
                checked_int("n_ctx", n_ctx, minimum=1, maximum=self.n_ctx_train,
                            why=f"the context {self.path.name} was trained for")
            self.n_batch = min(checked_int("n_batch", n_batch, minimum=1, why="tokens per prefill batch"), n_ctx)
            cparams = ll.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = cparams.n_ubatch = self.n_batch
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = self.threads
            cparams.type_k, cparams.type_v = (t.value for t in kv_types)
            cparams.no_perf = True
            cparams.flash_attn_type = {None: ll.LLAMA_FLASH_ATTN_TYPE_AUTO, True: ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                       False: ll.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
            self._ctx = ll.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise CheckpointError(f"llama.cpp could not make a context of {n_ctx} positions for {self.path}")
            # llama.cpp may round its cache up (to a multiple of 256); the limit stays what was asked
            self.n_ctx = min(n_ctx, int(ll.llama_n_ctx(self._ctx)))
            self._mem = ll.llama_get_memory(self._ctx)
            self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
            self.kv_types = kv_types  # (keys, values)
            self.n_vocab = self._vocab.n_vocab
            self.bos_id, self.eos_id = self._vocab.bos_id, self._vocab.eos_id
            self.add_bos = self._vocab.add_bos
            self.eog_ids = self._vocab.eog_ids
            self.chat_template = self._vocab.chat_template
        except BaseException:
            self.close()
            raise
        self._history: list[int] = []
        self._logits: np.ndarray | None = None
        self._sampling = Sampling()
        self._rng = make_rng(self._sampling)

    # -- state ---------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self._history)

    @property
    def history(self) -> list[int]:
        return list(self._history)

    def _live(self):
        if self._ctx is None:
            raise OptionError(f"the llama.cpp backend for {self.path.name} is closed")
        return self._ll

    # -- sequence ------------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        ll = self._live()
        if not 0 <= n <= self.n_past:
            raise OptionError(f"cannot keep {n} positions of a KV cache holding {self.n_past}")
        if n == self.n_past:
            return
        if not ll.llama_memory_seq_rm(self._mem, 0, n, -1):
            # caches that cannot drop a tail (recurrent, some sliding-window ones): rebuild the prefix
            keep = self._history[:n]
            ll.llama_memory_clear(self._mem, True)
            self._history = []
            if keep:
                self._decode(keep)
        else:
            del self._history[n:]
        self._logits = None

    def set_sampling(self, sampling: Sampling) -> None:
        self._sampling = sampling
        self._rng = make_rng(sampling)

    def _decode(self, tokens: Sequence[int], every_position: np.ndarray | None = None) -> None:
        """Append `tokens` to the cache in batches of n_batch, keeping the last position's logits, and
        every position's in `every_position` ([len(tokens), n_vocab]) when one is given."""
        ll = self._ll
        batch = self._batch
        start_past = len(self._history)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            n_past = len(self._history)
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = every_position is not None
            batch.logits[len(chunk) - 1] = True
            rc = ll.llama_decode(self._ctx, batch)
            if rc != 0:
                # the failed batch may have partly entered the cache: drop everything after n_past
                ll.llama_memory_seq_rm(self._mem, 0, n_past, -1)
                raise CheckpointError(f"llama.cpp failed to evaluate {len(chunk)} tokens at position {n_past} "
                                      f"(llama_decode returned {rc})")
            if every_position is not None:
                at = n_past - start_past
                every_position[at:at + len(chunk)] = np.ctypeslib.as_array(
                    ll.llama_get_logits(self._ctx), shape=(len(chunk), self.n_vocab))
            self._history.extend(chunk)
        ptr = ll.llama_get_logits_ith(self._ctx, -1)
        self._logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def evict(self, start: int, end: int) -> None:
        ll = self._live()
        if not 0 <= start <= end <= self.n_past:
            raise OptionError(f"cannot evict positions [{start}, {end}) of a KV cache holding {self.n_past}")
        if start == end:
            return
        if not ll.llama_memory_can_shift(self._mem):
            raise BackendError(f"llama.cpp cannot shift the KV cache of {self.path.name} (its memory type does not allow it)")
        ll.llama_memory_seq_rm(self._mem, 0, start, end)
        ll.llama_memory_seq_add(self._mem, 0, end, -1, start - end)  # keys re-rotated at the next decode
        del self._history[start:end]

    def compact(self, keep: int, sink: int, recent: int, probe: Sequence[int] = ()) -> np.ndarray:
        raise BackendError("the llama.cpp backend cannot compact its KV cache (it keeps or drops a position in every "
                           "layer and head at once): use context_overflow='sink-window', or the native backend")

    def step(self, tokens: Sequence[int], mask: np.ndarray | None = None) -> int:
        self._live()
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise OptionError("step() needs at least one token to evaluate")
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{self.n_past} cached + {len(tokens)} new tokens exceed the context of "
                                       f"{self.n_ctx} positions")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise OptionError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        self._decode(tokens)
        return sample(self._logits, self._history, self._sampling, self._rng, mask)

    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens to the KV cache and return their logits [len(tokens), n_vocab] (as the
        native backend's eval_logits: long-context scoring through a sliding cache)."""
        self._live()
        tokens = [int(t) for t in tokens]
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{self.n_past} cached + {len(tokens)} new tokens exceed the context of "
                                       f"{self.n_ctx}; evict or truncate first")
        out = np.empty((len(tokens), self.n_vocab), np.float32)
        self._decode(tokens, every_position=out)
        return out

    def all_logits(self, tokens: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Logits at every position of `tokens` evaluated from an empty cache: [len(tokens), n_vocab]
        float32, written into `out` when given (the evaluator's reused buffer)."""
        self._live()
        tokens = [int(t) for t in tokens]
        if not 0 < len(tokens) <= self.n_ctx:
            raise OptionError(f"all_logits() takes 1..{self.n_ctx} tokens, not {len(tokens)}")
        if out is None or out.shape != (len(tokens), self.n_vocab):
            out = np.empty((len(tokens), self.n_vocab), np.float32)
        self.truncate(0)
        self._decode(tokens, every_position=out)
        return out

    def logits(self) -> np.ndarray:
        if self._logits is None:
            raise OptionError("no logits: nothing has been evaluated since the cache was last changed")
        return self._logits.copy()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def stats(self) -> BackendStats:
        ll = self._live()
        n_layer = int(ll.llama_model_n_layer(self._model))
        n_head = int(ll.llama_model_n_head(self._model))
        n_head_kv = int(ll.llama_model_n_head_kv(self._model))
        arch = self._meta("general.architecture") or ""
        head_dim_k = int(self._meta(f"{arch}.attention.key_length") or ll.llama_model_n_embd(self._model) // n_head)
        head_dim_v = int(self._meta(f"{arch}.attention.value_length") or head_dim_k)
        k, v = self.kv_types
        kv_bytes = n_layer * self.n_ctx * n_head_kv * (head_dim_k * _KV_ELEMENT_BYTES[k] + head_dim_v * _KV_ELEMENT_BYTES[v])
        kv_type = k.name.lower() if k is v else f"{k.name.lower()}/{v.name.lower()}"
        return BackendStats(self.name, self.n_ctx, self.n_past, self.threads, int(ll.llama_model_size(self._model)),
                            {"kv_bytes": kv_bytes, "kv_type": kv_type, "memory_budget": self.memory_budget})

    def close(self) -> None:
        ll = getattr(self, "_ll", None)
        if ll is None:
            return
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()
