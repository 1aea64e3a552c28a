"""Speculative decoding: draft a few tokens cheaply, verify them in one batched forward pass of the
target, keep the longest accepted prefix, roll the KV cache back past the first rejection.

One loop, as llama.cpp's `common/speculative`: `Speculator.step` is the seam `Model._stream` calls
instead of `Backend.step`; it returns one or more tokens, the last of which is not yet in the KV
cache (exactly as `step`'s token). Drafters are small objects behind the `Drafter` protocol.

Exactness. Greedy: a drafted token is accepted when it is the arg-max of the target's logits at its
position after the same mask and repeat penalty the plain sampler applies; the native engine's
batched logits equal its one-token decode logits bit for bit for batches up to `MAX_VERIFY_TOKENS`
(kernels_x86.cpp, kPackMinTokens), so the output is token-identical to plain decoding. With
temperature > 0: the standard rejection rule (Leviathan et al., Chen et al.): accept a drafted token
d with probability min(1, p(d) / q(d)), else draw from the normalised residual max(0, p - q). p is
the engine's own sampler distribution after the whole chain (`_native.sampling_distribution`: mask,
penalty, top-k, top-p, min-p, temperature); the drafters here are deterministic given the context
(prompt lookup, greedy draft models), so q is a point mass on d: accept with p(d), else draw from p
without d. The output distribution is then exactly the target's; the tokens drawn for a given seed
differ from plain decoding's (the random stream is used differently).

Adaptive (`Speculator`): the draft length follows the measured acceptance (per draft source) and the
measured cost of verifying each batch size; speculation is off while no draft length beats a plain
step, and probed again after a back-off that doubles while it keeps not paying.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgeai.errors import OptionError
from edgeai.runtimes.base import Sampling

log = logging.getLogger(__name__)

# The longest batch a verification evaluates (the pending token(s) plus the draft): below the kernels'
# transposed-prefill threshold (kernels_x86.cpp kPackMinTokens = 16), so batch logits equal decode's.
MAX_VERIFY_TOKENS = 15
DEFAULT_DRAFT_TOKENS = 8
# Prompt lookup: n-gram sizes tried, longest first.
LOOKUP_MAX_NGRAM = 3
LOOKUP_MIN_NGRAM = 1


class DrafterKind(str, enum.Enum):
    LOOKUP = "lookup"  # n-grams of the prompt and the text so far
    SELF = "self"  # the target through a subset of its layers
    MODEL = "model"  # a draft model GGUF with the target's vocabulary


@dataclass(frozen=True)
class SpeculativeOptions:
    """What `edgeai.load(..., speculative=, draft_tokens=)` asked for, checked."""

    kind: DrafterKind
    draft_tokens: int  # the most tokens drafted per verification
    draft_path: Path | None = None  # DrafterKind.MODEL: the draft GGUF


def speculative_options(speculative: str | Path | None, draft_tokens: int | None) -> SpeculativeOptions | None:
    """`speculative` ("lookup", "self" or a draft model's path) and `draft_tokens` checked; None when
    speculation is off. Bad values are OptionErrors naming the option and the choices."""
    from edgeai.options import checked_int

    if speculative is None or speculative is False:
        if draft_tokens is not None:
            raise OptionError("draft_tokens needs speculative= ('lookup', 'self' or a draft model's path)")
        return None
    n = DEFAULT_DRAFT_TOKENS if draft_tokens is None else checked_int(
        "draft_tokens", draft_tokens, minimum=1, maximum=MAX_VERIFY_TOKENS - 1,
        why=f"at most {MAX_VERIFY_TOKENS - 1}: a verification batch of more than {MAX_VERIFY_TOKENS} tokens would "
            "not give the decode step's logits bit for bit")
    if isinstance(speculative, Path) or (isinstance(speculative, str) and speculative.lower() not in
                                         {k.value for k in DrafterKind if k is not DrafterKind.MODEL}):
        if not isinstance(speculative, (str, Path)) or not str(speculative).strip():
            raise OptionError(f"speculative must be 'lookup', 'self' or a draft model's path, got {speculative!r:.60}")
        path = Path(speculative)
        if not path.is_file():
            raise OptionError(f"speculative={str(speculative)!r} is neither 'lookup' nor 'self' nor an existing draft "
                              "model file (a GGUF with the target's vocabulary)")
        return SpeculativeOptions(DrafterKind.MODEL, n, path)
    if not isinstance(speculative, str):
        raise OptionError(f"speculative must be 'lookup', 'self' or a draft model's path, got {speculative!r:.60}")
    return SpeculativeOptions(DrafterKind(speculative.lower()), n)


def draft_kv_cache(target_kv_cache: str, draft_head_dim: int) -> str:
    """The draft model's KV cache type: the target's, unless the draft's head size cannot take a
    quantized one (a multiple of 32 is needed), then f16."""
    return target_kv_cache if draft_head_dim % 32 == 0 else "f16"


def speculative_memory(options: SpeculativeOptions | None, target, config: dict, *, n_ctx: int, threads: int,
                       kv_cache: str):
    """What `options` add to the memory plan of a target (`target`: its GGUF header; `config`: its
    engine config), a `runtimes.plan.SpeculativeMemory`, or None without speculation. A draft model is
    checked (the target's vocabulary, a file the native engine runs) and planned as `DraftModel`
    loads it: the target's context (at most the draft's trained one), threads and KV type."""
    from edgeai.native_bridge import kv_types
    from edgeai.native_bridge import native as _native
    from edgeai.runtimes.plan import ENGINE_OVERHEAD, SpeculativeMemory

    if options is None:
        return None
    verify = 2 * MAX_VERIFY_TOKENS * int(config["n_vocab"]) * 4
    if options.kind is not DrafterKind.MODEL:
        return SpeculativeMemory(options.kind.value, verify, MAX_VERIFY_TOKENS)
    from edgeai.gguf_header import read_header
    from edgeai.runtimes.native import engine_config

    from edgeai.runtimes.native import NativeBackend

    header = read_header(options.draft_path)
    check_same_vocabulary(target, header)
    reason = NativeBackend.can_run(header.path, header)
    if reason:
        raise OptionError(f"the draft model {header.path.name} cannot run in the native engine: {reason}")
    draft = engine_config(header)
    draft_ctx = min(n_ctx, int(draft.pop("n_ctx_train")))
    kv = draft_kv_cache(kv_cache, int(draft["head_dim"]))
    sizes = _native.memory_sizes(header.native, draft, draft_ctx, threads, kv_types(kv))
    return SpeculativeMemory(options.kind.value, verify, MAX_VERIFY_TOKENS, Path(options.draft_path),
                             sizes["dense"] + sizes["experts"], sizes["kv"], sizes["scratch"] + ENGINE_OVERHEAD,
                             draft_ctx, kv)


def memory_of(options: SpeculativeOptions | None):
    """`speculative_memory` bound to `options` (None without speculation): what the native backend
    takes to plan the memory speculation adds."""
    if options is None:
        return None
    return lambda target, config, **sizes: speculative_memory(options, target, config, **sizes)


@runtime_checkable
class Drafter(Protocol):
    """Proposes the tokens likely to follow a context. Deterministic given the context (the
    verifier treats its proposal as a point mass)."""

    name: str
    # True when drafting costs next to nothing (no model): the speculator then drafts the most it
    # may and cuts the draft to the length that pays, knowing its `source`
    cheap: bool
    # what made the last draft (prompt lookup: the n-gram size matched), or None: acceptance is
    # learnt per source, as a 3-gram match is accepted far more often than a 1-gram one
    source: object

    def draft(self, context: Sequence[int], n: int) -> list[int]:
        """Up to `n` tokens that may follow `context` (every token of the sequence so far, prompt
        included); [] when it has no guess (the step is then a plain one)."""

    def close(self) -> None:
        """Free what the drafter holds."""


class PromptLookup:
    """Prompt lookup decoding: the latest earlier occurrence of the context's last n-gram (longest
    n first, `max_ngram` down to `min_ngram`), and the tokens that followed it. No model, no memory
    beyond an index of the sequence's n-grams (kept incrementally while the sequence grows)."""

    name = DrafterKind.LOOKUP.value
    cheap = True

    def __init__(self, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM) -> None:
        assert 1 <= min_ngram <= max_ngram
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self._seq: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after its latest occurrence
        self.source: int | None = None  # the n-gram size of the last draft

    def _sync(self, context: Sequence[int]) -> None:
        """Index `context`, reusing the index when it extends the sequence indexed so far."""
        old = len(self._seq)
        if len(context) < old or list(context[:old]) != self._seq:
            self._seq, self._index, old = [], {}, 0
        self._seq.extend(int(t) for t in context[old:])
        seq, index = self._seq, self._index
        # entries need the token after the n-gram: positions i <= len - 1 (the last n-gram is the query)
        for i in range(max(1, old), len(seq)):
            for n in self.sizes:
                if i >= n:
                    index[tuple(seq[i - n:i])] = i

    def draft(self, context: Sequence[int], n: int) -> list[int]:
        self._sync(context)
        seq = self._seq
        self.source = None
        for size in self.sizes:
            if len(seq) <= size:
                continue
            at = self._index.get(tuple(seq[-size:]))
            if at is not None:
                self.source = size
                return seq[at:at + n]
        return []

    def close(self) -> None:
        self._seq, self._index = [], {}


class DraftModel:
    """A draft model: a smaller GGUF with the target's vocabulary, decoded greedily in the native
    engine. Its KV cache follows the target's sequence (common prefix kept, the rest evaluated), so
    a rejected draft costs it no recomputation either."""

    name = DrafterKind.MODEL.value
    cheap, source = False, None

    def __init__(self, path: Path, target, *, threads: int | None = None) -> None:
        from edgeai.gguf_header import read_header
        from edgeai.runtimes.native import NativeBackend, engine_config

        self.path = Path(path)
        header = read_header(self.path)
        check_same_vocabulary(read_header(target.path), header)  # before any weight is loaded
        reason = NativeBackend.can_run(self.path, header)
        if reason:
            raise OptionError(f"the draft model {self.path.name} cannot run in the native engine: {reason}")
        config = engine_config(header)
        n_ctx = min(target.n_ctx, int(config["n_ctx_train"]))
        # planned with the target (`speculative_memory`): no budget of its own
        self._be = NativeBackend(self.path, n_ctx=n_ctx, threads=threads or target.threads, header=header,
                                 kv_cache=draft_kv_cache(target.kv_cache, int(config["head_dim"])))
        self._be.set_sampling(Sampling(temperature=0.0))

    def draft(self, context: Sequence[int], n: int) -> list[int]:
        from edgeai.context import common_prefix

        be = self._be
        n = min(n, be.n_ctx - len(context))  # a draft trained for a shorter context stops drafting there
        if n <= 0:
            return []
        keep = min(common_prefix(be.history, context), len(context) - 1)  # evaluate at least one token
        be.truncate(keep)
        pending = list(context[keep:])
        out: list[int] = []
        for _ in range(n):
            tok = be.step(pending)
            out.append(tok)
            pending = [tok]
        return out

    def close(self) -> None:
        self._be.close()


class SelfDraft:
    """Self-speculation: the loaded target through a subset of its layers (every other layer of the
    second half skipped, the last kept), greedy. No second model, no extra memory: the draft's KV
    rows land in the target's cache at the positions being drafted (only the layers it runs), and
    are truncated before the verification rewrites them with the whole model.

    On SmolLM2-135M its arg-max agrees with the target's on about 28% of positions for 23 of 30
    layers (teacher-forced, three prompts): it does not pay there, and the pause turns it off."""

    name = DrafterKind.SELF.value
    cheap, source = False, None

    def __init__(self, target) -> None:
        n = int(target.n_layer)
        self._be = target
        self.skip = [n // 2 <= layer < n - 1 and layer % 2 == 1 for layer in range(n)]

    def draft(self, context: Sequence[int], n: int) -> list[int]:
        be = self._be
        n0 = be.n_past
        n = min(n, be.n_ctx - len(context))
        if n <= 0:
            return []
        pending, out = list(context[n0:]), []
        try:
            for _ in range(n):
                tok = int(np.argmax(be.eval_logits(pending, self.skip)[-1]))
                out.append(tok)
                pending = [tok]
        finally:
            be.truncate(n0)
        return out

    def close(self) -> None:
        pass


def check_same_vocabulary(target, draft) -> None:
    """OptionError naming both files unless the draft's GGUF header (`edgeai.gguf_header.GGUFHeader`)
    has the target's vocabulary: the same token strings, in the same order."""
    key = "tokenizer.ggml.tokens"
    want, got = (h.native.string_array(h.metadata[key].key) if h.get(key) is not None else None for h in (target, draft))
    if want is None or got is None:
        raise OptionError(f"{(target if want is None else draft).path.name} has no vocabulary ({key}) to compare: "
                          "a draft model needs the target's vocabulary")
    compare_vocabularies(got, want, draft=f"the draft model {draft.path.name}", target=f"the target {target.path.name}")


def compare_vocabularies(draft_tokens: Sequence[bytes], target_tokens: Sequence[bytes], *, draft: str,
                         target: str) -> None:
    """OptionError naming `draft` and `target` (how to call each in the message) unless the token
    strings are the same, in the same order."""
    if len(draft_tokens) != len(target_tokens):
        raise OptionError(f"{draft} has {len(draft_tokens)} tokens but {target} has {len(target_tokens)}: a draft "
                          "needs the target's vocabulary")
    for t, (a, b) in enumerate(zip(target_tokens, draft_tokens)):
        if a != b:
            raise OptionError(f"{draft} and {target} differ at token {t} ({b!r} vs {a!r}): a draft needs the "
                              "target's vocabulary")


@dataclass
class SpeculativeStats:
    """Counters since load, for `Model.stats()`."""

    drafter: str
    draft_tokens: int  # the most drafted per verification (draft_tokens=)
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    plain_steps: int = 0  # steps without a draft (none proposed, or speculation paused)
    paused_steps: int = 0  # of those, while speculation did not pay

    def as_dict(self) -> dict:
        return {"drafter": self.drafter, "draft_tokens": self.draft_tokens, "verifications": self.verifications,
                "drafted": self.drafted, "accepted": self.accepted, "plain_steps": self.plain_steps,
                "paused_steps": self.paused_steps,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "mean_accepted_length": self.accepted / self.verifications if self.verifications else 0.0}


class Speculator:
    """Draft, verify in one batch, accept, roll back, over one backend that has `eval_logits` and
    `truncate` (the native engine).

    Adaptive (unless `adaptive` is False: then every step drafts `draft_tokens`): the per-token
    acceptance a is estimated from recent verifications (accepted drafts / (accepted + rejections),
    the estimate for a geometric run), the cost of a verification (a plain step's times 1 + c (b - 1)
    for b tokens, the slope c learnt from every verification) and of drafting a token are measured,
    and each step drafts the k that maximises expected tokens per second,
    (1 - a^(k+1)) / (1 - a) tokens for k * draft + verify(k + pending) seconds, against a plain
    step's one token. When no k beats a plain step, speculation is off; it is probed again after a
    back-off that doubles while it keeps not paying."""

    DECAY = 0.9  # weight of the past in the acceptance counts (per verification)
    EMA = 0.2  # weight of the newest measurement in the running times
    MIN_BACKOFF, MAX_BACKOFF = 8, 256  # plain steps before probing again (doubling while it keeps not paying)

    def __init__(self, backend, drafter: Drafter, draft_tokens: int, *, adaptive: bool = True) -> None:
        self.backend = backend
        self.drafter = drafter
        self.k_max = draft_tokens
        self.adaptive = adaptive
        self.stats = SpeculativeStats(drafter.name, draft_tokens)
        self._params = Sampling()
        self._rng = np.random.default_rng()
        self._counts: dict[object, list[float]] = {}  # drafter source -> decayed [accepted drafts, rejections]
        self._plain_s: float | None = None  # running seconds of a plain decode step
        # a verification of b tokens costs a plain step times 1 + slope (b - 1): one slope learnt from
        # every verification (a running figure per batch size kept a stale first sample of a size it
        # then judged too dear and never measured again). Linear, measured: SmolLM2 Q4_0, 2 threads,
        # 1.12-1.19 plain steps for 2 tokens, 1.41-1.53 for 4, 2.1-2.2 for 8 (AMD EPYC). Starts low,
        # so that it gets measured.
        self._slope = 0.1
        self._draft_s = 0.0  # running seconds of drafting one token
        self._waited, self._backoff = 0, self.MIN_BACKOFF

    def begin(self, params: Sampling) -> None:
        """A new generation with these sampling parameters (the random stream is re-seeded, as the
        backend's is by `set_sampling`)."""
        self._params = params
        self._rng = np.random.default_rng(params.seed)
        # another prompt may be another kind of text: probe soon (what was learnt of acceptance stays)
        self._waited, self._backoff = 0, self.MIN_BACKOFF

    def _acceptance(self, source: object) -> float:
        acc, rej = self._counts.get(source, (1.0, 1.0))  # prior: a = 0.5
        return acc / (acc + rej)

    def _gain(self, k: int, n_pending: int, a: float) -> float:
        """Expected tokens per second drafting k tokens accepted each with probability a, over a
        plain step's."""
        a = min(a, 0.98)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        b = n_pending + k
        verify = self._plain_s * (1 + self._slope * (b - 1))
        return tokens * self._plain_s / (k * self._draft_s + verify)

    def draft_length(self, room: int, n_pending: int, source: object = None) -> int:
        """Tokens to draft (or to keep of a cheap drafter's draft from `source`) this step, at most
        `room`; 0: a plain step."""
        if room <= 0:
            return 0
        if not self.adaptive:
            return room
        if self._plain_s is None:
            return 0  # a plain step first: its time is the yardstick
        a = self._acceptance(source)
        gains = {k: self._gain(k, n_pending, a) for k in range(1, room + 1)}
        k = max(gains, key=gains.get)
        if gains[k] > 1.0:
            self._waited = 0
            return k
        self._waited += 1
        if self._waited < self._backoff:
            self.stats.paused_steps += 1
            return 0
        self._waited = 0  # probe: has it started to pay (another kind of text)?
        self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)
        return k

    def step(self, pending: list[int], context: list[int], *, limit: int, mask: np.ndarray | None = None,
             matcher=None) -> list[int]:
        """As `Backend.step(pending, mask)`, but may return several tokens: the accepted drafted ones,
        then the target's own token (the last, not yet in the KV cache). context: the whole sequence
        (KV history + pending); limit: the most tokens to return (max_tokens left); matcher: the
        active constraint's `edgeai.constraints.Matcher` (drafts are checked against its masks; it is
        left as it was: the caller consumes the returned tokens). `mask` is the matcher's current mask."""
        be, d = self.backend, self.drafter
        room = min(self.k_max, limit - 1, MAX_VERIFY_TOKENS - len(pending), be.n_ctx - be.n_past - len(pending))
        draft: list[int] = []
        t0 = time.perf_counter()
        if d.cheap:  # draft the most, keep what pays for its source
            draft = d.draft(context, room)[:room] if room > 0 and (self._plain_s is not None or not self.adaptive) else []
            draft = draft[:self.draft_length(len(draft), len(pending), d.source)] if draft else []
        else:
            n = self.draft_length(room, len(pending))
            draft = d.draft(context, n)[:n] if n > 0 else []
        source = d.source
        masks = [mask]
        if draft and matcher is not None:
            draft, masks = self._constrained(draft, mask, matcher)
        if not draft:
            t0 = time.perf_counter()
            tok = be.step(pending, mask)
            self._plain_s = self._ema(self._plain_s, time.perf_counter() - t0)
            self.stats.plain_steps += 1
            return [tok]
        drafted_s = time.perf_counter() - t0
        if not d.cheap:
            self._draft_s = self._ema(self._draft_s, drafted_s / len(draft))
        return self._verify(pending, draft, masks, drafted_s, source)

    def _constrained(self, draft: list[int], mask: np.ndarray, matcher) -> tuple[list[int], list[np.ndarray]]:
        """The prefix of `draft` the constraint allows, and the mask of each of its positions and of
        the one after it (an end-of-generation token ends the prefix; a token after which nothing may
        follow is left out). The matcher is rolled back to where it was."""
        masks, kept, consumed = [mask.copy()], [], 0
        eog = self.backend.eog_ids
        try:
            for tok in draft:
                if not (int(masks[-1][tok >> 5]) >> (tok & 31)) & 1:
                    break
                if tok in eog:  # allowed: the grammar is complete; the verifier stops at it
                    kept.append(tok)
                    break
                matcher.consume(tok)
                consumed += 1
                if matcher.stopped:
                    break
                kept.append(tok)
                masks.append(matcher.mask().copy())
        finally:
            if consumed:
                matcher.rollback(consumed)
        return kept, masks

    def _verify(self, pending: list[int], draft: list[int], masks: list[np.ndarray | None],
                drafted_s: float = 0.0, source: object = None) -> list[int]:
        """Evaluate pending + draft in one batch, accept the longest prefix the rule allows, draw the
        token after it, and truncate the cache to pending + the accepted drafts."""
        from edgeai.native_bridge import native as _native

        be, s = self.backend, self._params
        t0 = time.perf_counter()
        n0 = be.n_past
        history = be.history + pending
        logits = be.eval_logits(pending + draft)  # [len(pending) + len(draft), n_vocab]
        window = s.repeat_last_n if s.repeat_penalty != 1.0 else 0
        eog = be.eog_ids
        out: list[int] = []

        def distribution(i: int) -> tuple[np.ndarray, np.ndarray]:
            """(ids, probabilities) the plain sampler would draw the token after `history` from."""
            recent = history[max(0, len(history) - window):] if window else []
            ids, w = _native.sampling_distribution(logits[len(pending) - 1 + i], recent, s.temperature, s.top_k,
                                                   s.top_p, s.min_p, s.repeat_penalty, s.repeat_last_n,
                                                   masks[i] if i < len(masks) else None)
            return ids, w / w.sum()

        accepted = 0
        final = None
        for i, d in enumerate(draft):
            ids, p = distribution(i)
            if s.greedy:
                ok = int(ids[0]) == d
            else:
                hit = np.flatnonzero(ids == d)
                pd = float(p[hit[0]]) if hit.size else 0.0
                ok = self._rng.random() < pd
                if not ok:  # the residual max(0, p - q) of a point mass q at d: p without d
                    if hit.size:
                        p = p.copy()
                        p[hit[0]] = 0.0
                        p /= p.sum()
                    final = int(ids[self._rng.choice(len(ids), p=p)])
            if not ok:
                if s.greedy:
                    final = int(ids[0])
                break
            accepted += 1
            out.append(d)
            history.append(d)
            if d in eog:  # generation ends here: d is the step's token, not in the cache
                break
        else:
            ids, p = distribution(len(draft))  # every draft accepted: the target's next token
            final = int(ids[0]) if s.greedy else int(ids[self._rng.choice(len(ids), p=p)])
        if final is not None:
            out.append(final)
        # the cache keeps pending and the accepted drafts but the last returned token
        be.truncate(n0 + len(pending) + len(out) - 1)
        elapsed = time.perf_counter() - t0
        self._learn(len(pending) + len(draft), len(draft), accepted, len(out), elapsed, drafted_s, source)
        return out

    def _learn(self, batch: int, drafted: int, accepted: int, produced: int, seconds: float, drafted_s: float,
               source: object) -> None:
        st = self.stats
        st.verifications += 1
        st.drafted += drafted
        st.accepted += accepted
        acc, rej = self._counts.get(source, (1.0, 1.0))
        self._counts[source] = [self.DECAY * acc + accepted, self.DECAY * rej + (accepted < drafted)]
        if self._plain_s is None:
            return  # no plain step yet: nothing to weigh the verification against
        if batch > 1:
            self._slope = self._ema(self._slope, max(0.0, seconds / self._plain_s - 1) / (batch - 1))
        if produced * self._plain_s > seconds + drafted_s:
            self._backoff = self.MIN_BACKOFF  # it paid: probe soon again after a pause

    @classmethod
    def _ema(cls, old: float | None, new: float) -> float:
        return new if old is None else (1 - cls.EMA) * old + cls.EMA * new

    def close(self) -> None:
        self.drafter.close()


def cannot_speculate(backend_name: str) -> Exception:
    """The refusal of a backend that cannot verify in a batch (llama.cpp, onnxruntime), by name."""
    from edgeai.errors import BackendError

    return BackendError(f"speculative decoding needs the native engine (batched verification with decode's logits bit "
                        f"for bit, and KV rollback); the {backend_name} backend cannot speculate: load with "
                        "backend='native' or without speculative=")


def speculator_for(backend, options: SpeculativeOptions | None) -> Speculator | None:
    """The Speculator `options` ask for over `backend`, or None; a backend that cannot verify in a
    batch (no `eval_logits`: llama.cpp, onnxruntime) is refused by name."""
    if options is None:
        return None
    if not hasattr(backend, "eval_logits") or backend.name != "native":
        raise cannot_speculate(backend.name)
    if options.kind is DrafterKind.LOOKUP:
        drafter: Drafter = PromptLookup()
    elif options.kind is DrafterKind.MODEL:
        drafter = DraftModel(options.draft_path, backend)
    else:
        if backend.stats().extra["expert_store"].get("layers") is not None:
            raise OptionError("speculative='self' cannot skip layers while dense layers are streamed from the file "
                              "(memory budget); use speculative='lookup' or a larger memory_budget")
        drafter = SelfDraft(backend)
    return Speculator(backend, drafter, options.draft_tokens)
