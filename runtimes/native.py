"""The native backend: edgeai's C++ engine (`edgeai._native.Engine`) behind `runtimes.base.Backend`.

The engine reads the GGUF itself (its own validated mmap reader), computes the forward pass with
the kernel set chosen for this CPU, and samples in C++: one call per decode step, GIL released.
What it needs to know about the architecture family (rope style, q/k norm kind, top-k
renormalisation) comes from the one architecture table, `edgeai/architectures.py`. The header is
read once per load (`edgeai.gguf_header`) and the same parsed header goes to the planner and the engine.

Tokenization is text work, not weight work: it is done by llama.cpp's tokenizer on the same file
(llama-cpp-python, vocabulary only: no weights are loaded), so both engines see the same ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeai.errors import (CheckpointError, ContextOverflowError, OptionError,
                           UnsupportedArchitectureError)
from edgeai.gguf_header import GGUFHeader, read_header
from edgeai.native_bridge import kv_types
from edgeai.native_bridge import native as _native
from edgeai.runtimes.expert_store import ExpertStoreOptions, checked_store_options, native_stream_config, policy_name
from edgeai.runtimes.base import DEFAULT_N_CTX, BackendStats, Sampling, kv_cache_type
from edgeai.runtimes.vocab import VocabText

log = logging.getLogger(__name__)



def engine_config(header: GGUFHeader) -> dict:
    """The engine's ModelConfig for a GGUF: hyper-parameters from its header, family facts from
    the architecture table. Raises UnsupportedArchitectureError for what the engine does not run."""
    from edgeai.architectures import (SWIGLU_OAI, YARN_BETAS, FFNActivation, QKNorm, RopeStyle, hparams_from_gguf,
                                      spec_for_gguf)

    meta, path = header.metadata, header.path
    try:
        spec = spec_for_gguf(meta, str(path))
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{exc}; the llama.cpp backend may run it (backend='llama.cpp')") from exc
    hp = hparams_from_gguf(meta, spec, str(path))
    embd = header.tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")
    n_vocab = int(embd.shape[1])
    scaling = hp.rope_scaling or {}
    return {
        "n_vocab": n_vocab,
        "n_embd": hp.n_embd,
        "n_layer": hp.n_layer,
        "n_head": hp.n_head,
        "n_head_kv": hp.n_head_kv,
        "head_dim": hp.head_dim,
        "n_expert": hp.n_expert,
        "n_expert_used": hp.n_expert_used,
        "rms_eps": hp.rms_eps,
        "rope_theta": hp.rope_theta,
        "rope_linear_factor": float(scaling.get("factor", 1.0)) if scaling.get("rope_type") == "linear" else 1.0,
        "rope_neox": spec.rope is RopeStyle.NEOX,
        "qk_norm": {QKNorm.NONE: 0, QKNorm.PER_HEAD: 1, QKNorm.FULL: 2}[spec.qk_norm],
        "moe_renormalize": bool(spec.moe and spec.moe.renormalizes_top_k),
        # Gemma 3 (sliding_window 0 and the rest at their defaults for every other family)
        "ffn_gelu": spec.ffn_act is FFNActivation.GELU_TANH,
        "post_norms": spec.sandwich_norms,
        "embd_scale": float(np.sqrt(hp.n_embd)) if spec.scaled_embedding else 1.0,
        "attn_scale": 1.0 / float(np.sqrt(spec.query_scale_dim(hp) if spec.query_scale_dim else hp.head_dim)),
        "n_swa": hp.sliding_window,
        "swa_pattern": hp.swa_pattern,
        "rope_theta_swa": hp.rope_theta_swa or hp.rope_theta,
        "logit_softcap": hp.final_logit_softcap,
        # gpt-oss (off for every other family)
        "attn_sinks": spec.attn_sinks,
        "ffn_norm_post_attention": spec.ffn_norm_gguf == "post_attention_norm",
        "swa_rope_global": not spec.swa_own_rope,
        "swiglu_alpha": SWIGLU_OAI[0] if spec.ffn_act is FFNActivation.SWIGLU_OAI else 0.0,
        "swiglu_limit": SWIGLU_OAI[1] if spec.ffn_act is FFNActivation.SWIGLU_OAI else 0.0,
        "rope_yarn_factor": float(scaling["factor"]) if scaling.get("rope_type") == "yarn" else 0.0,
        "rope_yarn_beta_fast": YARN_BETAS[0],
        "rope_yarn_beta_slow": YARN_BETAS[1],
        "rope_yarn_orig_ctx": int(scaling.get("original_max_position_embeddings", 0)),
        "n_ctx_train": hp.n_ctx_train,
    }


def _prepare(path: Path, header: GGUFHeader | None, n_ctx: int | None,
             threads: int | None) -> tuple[GGUFHeader, dict, int, int, int]:
    """(header, engine config, n_ctx_train, n_ctx, threads) for a file, checked; the header is read
    here unless the caller already has it."""
    header = header or read_header(path)
    config = engine_config(header)
    n_ctx_train = int(config.pop("n_ctx_train"))
    from edgeai.options import checked_int

    n_ctx = min(DEFAULT_N_CTX, n_ctx_train) if n_ctx is None else \
        checked_int("n_ctx", n_ctx, minimum=1, maximum=n_ctx_train, why=f"the context {header.path.name} was trained for")
    from edgeai.devices import checked_threads

    threads = checked_threads(threads)
    return header, config, n_ctx_train, n_ctx, threads


def _speculative_memory(plan_speculation, header: GGUFHeader, config: dict, n_ctx: int, threads: int, kv_cache: str):
    """What speculation adds to the plan: `plan_speculation` is the caller's function (the API binds
    `edgeai.speculative.speculative_memory` to its options, so that this layer never imports the
    generation layer above it), or None."""
    if plan_speculation is None:
        return None
    return plan_speculation(header, {**config}, n_ctx=n_ctx, threads=threads, kv_cache=kv_cache)


MAX_PARALLEL = 64  # sequence slots the engine holds at most (one batched decode step is one forward batch)


def checked_parallel(parallel: int) -> int:
    from edgeai.options import checked_int

    return checked_int("parallel", parallel, minimum=1, maximum=MAX_PARALLEL,
                       why="sequence slots, each with its own KV cache: requests decoded together in one batched step")


class NativeBackend(VocabText):
    """A GGUF in edgeai's C++ engine: one model and `n_seq` sequence slots (see `runtimes.base.Backend`).

    The `Backend` calls act on slot 0; each takes `seq=` for another slot, and `step_batch` steps
    several slots at once (`edgeai.batch.BatchGenerator` drives it)."""

    name = "native"
    can_evict = True
    can_compact = True
    n_seq = 1

    @classmethod
    def can_run(cls, path: Path, header: GGUFHeader | None = None) -> str | None:
        """None when the engine runs this file, else why not (architecture, tensor type...).
        header: the file's header when the caller has read it (else it is read here)."""
        # A reason is returned only for what another backend may run (an architecture or tensor type
        # this engine lacks); a corrupt file (a format error, impossible hyper-parameters) or a
        # vocabulary llama.cpp's loader aborts on is raised: no backend runs it, and suggesting
        # llama.cpp only led to a second failure.
        if header is None:
            path = Path(path)
            if not path.is_file():
                return f"{path} is not a file" if path.exists() else f"{path} does not exist"
            with open(path, "rb") as f:
                head = f.read(4)
            if head != b"GGUF":  # not a GGUF at all: another backend's format, maybe
                return f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF')"
        header = header or read_header(path)  # a corrupt file raises; the reader knows every ggml type gguf-py does
        try:
            engine_config(header)
        except UnsupportedArchitectureError as exc:
            return str(exc)
        runs = _native.engine_types()
        for t in header.tensors.values():
            if t.type not in runs:
                return (f"{header.path}: tensor {t.name} has type {t.type_name}, which the native engine does not run "
                        f"(it runs {', '.join(sorted(runs.values()))}); the llama.cpp backend can")
        return None

    @classmethod
    def plan_for(cls, path: Path, *, n_ctx: int | None = None, threads: int | None = None,
                 memory_budget: int | None = None, kv_cache: str | None = None, header: GGUFHeader | None = None,
                 speculative=None, parallel: int = 1, observe: int = 0):
        """The memory plan loading `path` would follow (`runtimes.plan.MemoryPlan`), without loading
        it; raises BudgetError as loading would. speculative, parallel, observe: as for the constructor."""
        from edgeai.runtimes.plan import plan_memory
        from edgeai.runtimes.vocab import GGUFVocab

        header, config, _, n_ctx, threads = _prepare(path, header, n_ctx, threads)
        vocab = GGUFVocab(header.path, checked=True)  # held while planning, as when loading
        try:
            kv_cache = kv_cache_type(kv_cache)
            return plan_memory(header, config, budget=memory_budget, n_ctx=n_ctx, threads=threads, kv_cache=kv_cache,
                               speculative=_speculative_memory(speculative, header, config, n_ctx, threads, kv_cache),
                               n_seq=checked_parallel(parallel), observe=observe)
        finally:
            vocab.close()

    def __init__(self, path: Path, *, n_ctx: int | None = None, threads: int | None = None,
                 memory_budget: int | None = None, kv_cache: str | None = None, isa: str = "",
                 expert_store: Mapping | ExpertStoreOptions | None = None, header: GGUFHeader | None = None,
                 speculative=None, parallel: int = 1, observe: int = 0) -> None:
        """Load `path` (a GGUF the engine runs, see `can_run`).

        kv_cache: "f16" (default), "q8_0", "q4_0", or keys/values such as "q8_0/q4_0"
        (`runtimes.base.kv_cache_type`; the planner refuses a quantized type for a head size that is
        not a multiple of 32).
        memory_budget: bytes for the whole process; the planner (`runtimes.plan`) splits it and
        streams MoE experts from the file when they do not fit, or raises BudgetError.
        expert_store: options of the streaming expert store, a mapping of option names or an
        `ExpertStoreOptions` (policy: next-use|lru|lfu|layer, io: auto|uring|pread, io_threads,
        direct, trace, retries, prefetch (False: demand reads only); slots: stream with this many
        slots whatever the budget); unknown options and values are OptionErrors naming the choices.
        header: the file's header when the caller has read it (`edgeai.gguf_header.read_header`).
        speculative: None, or a function (header, config, n_ctx=, threads=, kv_cache=) -> the
        `runtimes.plan.SpeculativeMemory` of the speculation the model will run with (the draft model
        and the verification's logits), which the plan counts.
        parallel: sequence slots (1..64), each with its own KV cache of n_ctx positions (the planner
        counts them all), for batched decoding of several sequences (`edgeai.batch`).
        observe: the engine keeps the queries of each slot's last `observe` positions, which
        `compact` scores the cached keys by (context_overflow="compact"; the planner counts them).
        """
        from edgeai.runtimes.plan import plan_memory

        header, config, self.n_ctx_train, n_ctx, self.threads = _prepare(path, header, n_ctx, threads)
        self.n_seq = checked_parallel(parallel)
        self.path = header.path
        self.memory_budget = memory_budget
        self.kv_cache = kv_cache_type(kv_cache)
        from edgeai.runtimes.vocab import GGUFVocab

        self._engine = None
        self._vocab = GGUFVocab(self.path, checked=True)  # first: the planner counts it in the process's memory
        try:
            self.plan = plan_memory(header, config, budget=memory_budget, n_ctx=n_ctx, threads=self.threads,
                                    kv_cache=self.kv_cache,
                                    speculative=_speculative_memory(speculative, header, config, n_ctx, self.threads,
                                                                    self.kv_cache), n_seq=self.n_seq, observe=observe)
            options = checked_store_options(expert_store, n_layer=int(config["n_layer"]), n_expert=int(config["n_expert"]))
            # options with slots stream whatever the plan says (tests, benchmarks)
            stream = self.plan.stream_config(options) or (options if options.slots is not None else None)
            try:
                self._engine = _native.Engine(header.native, config, n_ctx, self.threads, isa,
                                              None if stream is None else native_stream_config(stream), kv_types(self.kv_cache),
                                              self.n_seq)
            except _native.ModelError as exc:
                raise CheckpointError(str(exc)) from exc
        except BaseException:
            self._vocab.close()
            raise
        self.n_ctx = n_ctx
        self.n_vocab = int(config["n_vocab"])
        self.n_layer = int(config["n_layer"])
        self._sliding_window = int(config["n_swa"])
        self.can_evict = self.can_compact = not self._sliding_window  # see evict(): rings cannot shift
        if observe:
            self._engine.observe(observe)
        self.bos_id = self._vocab.bos_id
        self.add_bos = self._vocab.add_bos  # tokenize() starts with BOS
        self.eos_id = self._vocab.eos_id
        self.eog_ids = self._vocab.eog_ids
        self.chat_template = self._vocab.chat_template
        self.isa = self._engine.isa
        self.set_sampling(Sampling())

    def _live(self):
        if self._engine is None:
            raise OptionError(f"the native backend for {self.path.name} is closed")
        return self._engine

    @property
    def n_past(self) -> int:
        return self._live().n_past

    @property
    def history(self) -> list[int]:
        return list(self._live().history)

    def _seq(self, seq: int) -> int:
        if not (isinstance(seq, int) and 0 <= seq < self.n_seq):
            raise OptionError(f"sequence slot {seq!r} does not exist: {self.path.name} is loaded with {self.n_seq} "
                              f"(slots 0..{self.n_seq - 1}; load(parallel=N) for more)")
        return seq

    def n_past_of(self, seq: int) -> int:
        """Positions slot `seq`'s KV cache holds."""
        return self._live().past_of(self._seq(seq))

    def history_of(self, seq: int) -> list[int]:
        """Token ids in slot `seq`'s KV cache."""
        return list(self._live().history_of(self._seq(seq)))

    def truncate(self, n: int, seq: int = 0) -> None:
        engine = self._live()
        n_past = engine.past_of(self._seq(seq))
        if not 0 <= n <= n_past:
            raise OptionError(f"cannot keep {n} positions of a KV cache holding {n_past}")
        engine.truncate(n, seq)

    def set_sampling(self, sampling: Sampling, seq: int = 0) -> None:
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._live().set_sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                                  sampling.repeat_penalty, sampling.repeat_last_n, seed & (2**64 - 1), self._seq(seq))

    def _check_room(self, tokens: Sequence[int], seq: int = 0) -> None:
        n_past = self._live().past_of(self._seq(seq))
        if n_past + len(tokens) > self.n_ctx:
            slot = f" (sequence slot {seq})" if self.n_seq > 1 else ""
            raise ContextOverflowError(f"{n_past} + {len(tokens)} tokens exceed the context of {self.n_ctx} "
                                       f"positions of {self.path.name}{slot}")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise OptionError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.n_vocab - 1})")

    def _call(self, method: str, *args):
        """An engine call whose C++ errors (an expert read that failed, the file truncated while
        running) reach the caller as CheckpointError; the engine stays usable."""
        try:
            return getattr(self._live(), method)(*args)
        except _native.ModelError as exc:
            raise CheckpointError(str(exc)) from exc

    def _mask(self, mask: np.ndarray | None) -> np.ndarray | None:
        if mask is None:
            return None
        from edgeai.runtimes.sampling import checked_mask

        return checked_mask(mask, self.n_vocab)  # the engine applies it in C++, GIL released

    # step(..., mask_fn=): the mask may be computed while the forward pass runs (`edgeai.constraints.MaskAhead`)
    overlaps_masks = True

    def step(self, tokens: Sequence[int], mask: np.ndarray | None = None, seq: int = 0,
             mask_fn: Callable[[], np.ndarray | None] | None = None) -> int:
        """`Backend.step`; mask_fn, instead of mask: called once the forward pass is done for the mask
        to sample under; its None means do not sample (the step returns -1, the tokens are cached)."""
        tokens = [int(t) for t in tokens]
        self._check_room(tokens, seq)
        if mask_fn is None:
            return int(self._call("step", tokens, self._mask(mask), seq))
        if mask is not None:
            raise OptionError("give a step a mask or a mask_fn, not both")
        return int(self._call("step", tokens, None, seq, lambda: None if (w := mask_fn()) is None else self._mask(w)))

    def step_batch(self, steps: Sequence[tuple[int, Sequence[int], bool, np.ndarray | None]]) -> list[int]:
        """One engine call for several slots: each (slot, tokens, sample, mask) appends `tokens` to
        the slot's cache and, with `sample`, draws its next token with the slot's sampler under `mask`
        (-1 where not sampled). One-token entries share one forward batch: every weight is read
        once for them all; each slot gets the logits it would get alone (`Engine.step_batch`)."""
        seqs, tokens, sample, masks = [], [], [], []
        for seq, toks, smp, mask in steps:
            toks = [int(t) for t in toks]
            self._check_room(toks, seq)
            seqs.append(seq)
            tokens.append(toks)
            sample.append(bool(smp))
            masks.append(self._mask(mask))
        if len(set(seqs)) != len(seqs):
            raise OptionError(f"a batched step names a sequence slot twice: {seqs}")
        return [int(t) for t in self._call("step_batch", seqs, tokens, sample, masks)]

    def evict(self, start: int, end: int, seq: int = 0) -> None:
        engine = self._live()
        n_past = engine.past_of(self._seq(seq))
        if not 0 <= start <= end <= n_past:
            raise OptionError(f"cannot evict positions [{start}, {end}) of a KV cache holding {n_past}")
        if self._sliding_window and end > start:
            from edgeai.errors import BackendError

            raise BackendError(f"{self.path.name} has sliding-window layers, whose KV rings the native engine does not "
                               "shift: it cannot evict positions; truncate and evaluate again, or use the llama.cpp backend")
        engine.evict(start, end, seq)

    def compact(self, keep: int, sink: int, recent: int, probe: Sequence[int] = (), seq: int = 0) -> np.ndarray:
        engine = self._live()
        slot = self._seq(seq)
        n = engine.past_of(slot)
        if not 0 <= sink + recent <= keep <= n:
            raise OptionError(f"cannot compact a KV cache of {n} positions to {keep} keeping {sink} sink and {recent} "
                              "recent ones (0 <= sink + recent <= keep <= positions held)")
        if not self.can_compact:
            from edgeai.errors import BackendError

            raise BackendError(f"{self.path.name} has sliding-window layers, whose KV rings the native engine does not "
                               "shift: it cannot compact its cache; use context_overflow='drop-turns'")
        if not engine.observed:
            raise OptionError("compaction scores keys by the latest queries, which this engine does not keep: load it "
                              "with observe=N (edgeai.load(context_overflow='compact') does)")
        probe = list(probe)
        if probe:
            if n + len(probe) > self.n_ctx:
                raise OptionError(f"a probe of {len(probe)} tokens does not fit after {n} of {self.n_ctx} positions")
            self._call("eval", probe, False, None, slot)
        return self._call("compact", n, keep, sink, recent, slot)

    def eval_logits(self, tokens: Sequence[int], skip_layers: Sequence[bool] | None = None) -> np.ndarray:
        """Append tokens and return their logits [len(tokens), n_vocab] (tests, evaluation, speculative
        verification). skip_layers: [n_layer] flags of layers left out (self-speculative drafting:
        the KV positions it fills are the draft's, to be truncated)."""
        tokens = [int(t) for t in tokens]
        self._check_room(tokens)
        if skip_layers is not None:
            skip_layers = [1 if s else 0 for s in skip_layers]
        return self._call("eval", tokens, True, skip_layers)

    def logits(self, seq: int = 0) -> np.ndarray:
        return self._live().logits(self._seq(seq))

    def stats(self):
        e = self._live()
        store = e.store_stats()
        for part in (store, store.get("layers")):
            if part is not None:  # the engine reports its enum; users read the name they set
                part["policy"] = policy_name(part["policy"])
        extra = {"kv_bytes": e.kv_bytes, "kv_type": e.kv_type, "isa": e.isa, "memory_budget": self.memory_budget,
                 "parallel": self.n_seq, "expert_store": store}
        if store["streaming"] and store["hits"] + store["misses"]:
            extra["expert_cache_hit_rate"] = store["hits"] / (store["hits"] + store["misses"])
            extra["expert_cache"] = f"{store['slots']} slots, {store['bytes_read'] / 2**20:.1f} MiB read ({store['io']})"
        return BackendStats(backend=self.name, n_ctx=self.n_ctx, n_past=e.n_past, threads=e.threads,
                            weights_bytes=e.weight_bytes, extra=extra)

    def expert_trace(self) -> list[int]:
        """Demand expert accesses (layer * n_expert + expert) in order, when traced (expert_store={"trace": True})."""
        return list(self._live().store_trace())

    def reset_expert_stats(self) -> None:
        self._live().reset_store_stats()

    def close(self) -> None:
        if getattr(self, "_engine", None) is not None:
            self._engine = None
            self._vocab.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class NativeLogits:
    """A GGUF file in the native engine as the evaluator's `LogitsProvider` (`edgeai.evaluate`): what
    the engine's own choices (its KV cache types) cost, scored against a llama.cpp reference."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int = 0, kv_cache: str | None = None):
        self.path = Path(path)
        self._backend = NativeBackend(self.path, n_ctx=n_ctx, threads=threads or None, kv_cache=kv_cache)
        self.n_vocab = self._backend.n_vocab
        self.bos_token = self._backend.bos_id if self._backend.add_bos else None

    def tokenize(self, text: str) -> list[int]:
        """BOS as the model adds it; special-token markup is plain text (as llama-perplexity does)."""
        return self._backend.tokenize(text, add_special=True, parse_special=False)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """One evaluation of `tokens` from an empty KV cache: [len(tokens), n_vocab]."""
        self._backend.truncate(0)
        return self._backend.eval_logits(tokens)

    def close(self) -> None:
        self._backend.close()
