"""Speculative decoding (edgeai/speculative.py): the same output as plain decoding, the same KV cache
after it, the target's distribution when sampling, and refusals by name."""

import math

import numpy as np
import pytest

import edgeai
from edgeai.errors import BackendError, OptionError
from edgeai.native_bridge import native as _native
from edgeai.runtimes.base import Sampling
from edgeai.speculative import MAX_VERIFY_TOKENS, PromptLookup, Speculator

PASSAGE = ("Rewrite this passage with the spelling fixed: The quick brown fox jumpd over the lazy dog. Evrey "
           "morning the fox woud run through the forest, looking for food and avoiding the hunters.")


class Oracle:
    """A drafter that proposes a known continuation with every `every`-th token wrong: exercises full
    acceptance (bonus token), partial acceptance and rejection at the first position."""

    name = "oracle"
    cheap, source = True, None

    def __init__(self, prompt_len: int, continuation: list[int], every: int = 5, wrong: int = 3) -> None:
        self.prompt_len, self.cont, self.every, self.wrong = prompt_len, continuation, every, wrong
        self.calls = 0

    def draft(self, context, n):
        self.calls += 1
        at = len(context) - self.prompt_len
        out = list(self.cont[at:at + n])
        if self.calls % self.every == 0 and out:
            out[len(out) // 2] = self.wrong if out[len(out) // 2] != self.wrong else self.wrong + 1
        return out

    def close(self):
        pass


def _plain(path, prompt, n, kv="f16", **opts):
    with edgeai.load(path, backend="native", threads=1, kv_cache=kv) as m:
        chunks = list(m.stream(prompt, max_tokens=n, temperature=0, **opts))
        return [c.token for c in chunks if c.token is not None], m.backend.history, m.backend.logits().copy()


def _speculative(model, prompt, n, **opts):
    chunks = list(model.stream(prompt, max_tokens=n, temperature=0, **opts))
    return [c.token for c in chunks if c.token is not None], chunks


def test_prompt_lookup_drafts_the_latest_longest_match():
    d = PromptLookup(max_ngram=3, min_ngram=1)
    assert d.draft([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # latest 3-gram [1, 2, 3]
    assert d.draft([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3, 7], 2) == [8, 1]  # extends the index incrementally
    assert d.draft([5, 6, 7], 4) == []  # a new sequence: no match
    assert d.draft([4, 1, 5, 1], 4) == [5, 1]  # falls back to shorter n-grams


def test_options_are_checked_by_name(tiny_chat_gguf):
    with pytest.raises(OptionError, match="speculative"):
        edgeai.load(tiny_chat_gguf, speculative="lookahead")
    with pytest.raises(OptionError, match="draft_tokens"):
        edgeai.load(tiny_chat_gguf, speculative="lookup", draft_tokens=MAX_VERIFY_TOKENS)
    with pytest.raises(OptionError, match="draft_tokens needs speculative"):
        edgeai.load(tiny_chat_gguf, draft_tokens=4)
    with pytest.raises(BackendError, match="llama.cpp backend cannot speculate"):
        edgeai.load(tiny_chat_gguf, backend="llama.cpp", speculative="lookup")


def test_draft_model_with_another_vocabulary_is_refused(tiny_chat_gguf):
    from edgeai.paths import default_model_path

    with pytest.raises(OptionError, match=r"draft model tiny-f32\.gguf.*vocabulary"):
        edgeai.load(default_model_path(), speculative=str(tiny_chat_gguf))


@pytest.mark.parametrize("repeat_penalty", [1.0, 1.3])
def test_greedy_tiny_is_token_identical_with_every_drafter(tiny_chat_gguf, repeat_penalty):
    prompt = "a b c a b c a b c the cat the cat the"
    want, history, logits = _plain(tiny_chat_gguf, prompt, 48, repeat_penalty=repeat_penalty)
    for spec in ("lookup", "self", str(tiny_chat_gguf)):  # the target as its own draft model: every draft accepted
        with edgeai.load(tiny_chat_gguf, backend="native", threads=1, speculative=spec, draft_tokens=6) as m:
            got, chunks = _speculative(m, prompt, 48, repeat_penalty=repeat_penalty)
            assert got == want, spec
            assert len(chunks) == len(want) + (chunks[-1].token is None)  # one chunk per token
            assert m.backend.history == history  # the cache holds what plain decoding's holds
            st = m.stats().extra["speculative"]
            assert st["verifications"] > 0
            if spec not in ("lookup", "self") and repeat_penalty == 1.0:  # (the draft drafts without the penalty)
                assert st["acceptance_rate"] == 1.0


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_greedy_smollm2_is_token_identical_and_rolls_back_exactly(kv):
    from edgeai.paths import default_model_path

    path = default_model_path()
    with edgeai.load(path, backend="native", threads=1, kv_cache=kv) as m:
        prompt = m.chat_tokens([{"role": "user", "content": PASSAGE}])
    want, history, _ = _plain(path, prompt, 40, kv)
    with edgeai.load(path, backend="native", threads=1, kv_cache=kv, speculative="lookup") as m:
        got, _ = _speculative(m, prompt, 40)
        assert got == want
        assert m.stats().extra["speculative"]["accepted"] > 0
        # an oracle drafter: long accepted runs, bonus tokens, rejections in the middle and at the start
        m._speculator.drafter = Oracle(len(prompt), want, every=3)
        m._speculator.adaptive = False  # draft draft_tokens every step, however the timing goes
        got, _ = _speculative(m, prompt, 40)
        assert got == want
        assert m.backend.history == history
        # the rolled-back cache continues exactly as the plain one: same next logits, bit for bit
        nxt = m.backend.eval_logits([want[-1]])[0]
    with edgeai.load(path, backend="native", threads=1, kv_cache=kv) as m:
        m.backend.eval_logits(history)
        assert np.array_equal(nxt, m.backend.eval_logits([want[-1]])[0])


def test_self_speculation_smollm2_is_token_identical():
    from edgeai.paths import default_model_path

    path = default_model_path()
    want, history, _ = _plain(path, PASSAGE, 24)
    with edgeai.load(path, backend="native", threads=1, speculative="self", draft_tokens=4) as m:
        m._speculator.adaptive = False  # keep drafting although it does not pay here
        got, _ = _speculative(m, PASSAGE, 24)
        assert got == want
        assert m.backend.history == history
        assert m.stats().extra["speculative"]["verifications"] > 2


def test_batched_logits_equal_decode_logits_at_every_verify_size():
    """Verification is exact only because a batch's logits are the one-token step's, bit for bit."""
    from edgeai.paths import default_model_path
    from edgeai.runtimes.native import NativeBackend

    be = NativeBackend(default_model_path(), n_ctx=256, threads=1)
    try:
        prompt = be.tokenize("Once upon a time, in a land far away, there lived")
        be.eval_logits(prompt[:-1])
        seq, single = [prompt[-1]], []
        for _ in range(MAX_VERIFY_TOKENS):
            row = be.eval_logits([seq[-1]])[0]
            single.append(row)
            seq.append(int(np.argmax(row)))
        for size in range(2, MAX_VERIFY_TOKENS + 1):
            be.truncate(len(prompt) - 1)
            batch = be.eval_logits(seq[:size])
            for i in range(size):
                assert np.array_equal(batch[i], single[i]), (size, i)
    finally:
        be.close()


def test_constrained_greedy_is_identical():
    from edgeai.paths import default_model_path

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
              "required": ["name", "city"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Extract the name and city as JSON: Alice Smith lives in Paris. "
                                        "Alice Smith lives in Paris."}]
    with edgeai.load(default_model_path(), threads=1) as m:
        want = m.chat(msgs, json_schema=schema, temperature=0, max_tokens=40)
    with edgeai.load(default_model_path(), threads=1, speculative="lookup") as m:
        got = m.chat(msgs, json_schema=schema, temperature=0, max_tokens=40)
        assert str(got) == str(want) and got.incomplete == want.incomplete
        assert m.stats().extra["speculative"]["verifications"] > 0


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """p-value of Pearson's chi-square (Wilson-Hilferty normal approximation of the chi-square tail)."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    k = len(observed) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _buckets(counts: dict, probs: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Observed and expected counts, tokens expected fewer than 5 times lumped together."""
    big = [t for t, p in probs.items() if p * n >= 5]
    obs = [counts.get(t, 0) for t in big] + [n - sum(counts.get(t, 0) for t in big)]
    exp = [probs[t] * n for t in big] + [n * (1 - sum(probs[t] for t in big))]
    if exp[-1] < 5:
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    return np.asarray(obs, float), np.asarray(exp, float)


def test_sampling_keeps_the_target_distribution(tiny_chat_gguf):
    """The first two tokens of a speculative step, over many draws, follow the target's sampler
    (its whole chain: penalty, top-k, top-p, min-p, temperature): the accept/residual rule is exact."""
    from edgeai.runtimes.native import NativeBackend

    s = Sampling(temperature=0.9, top_k=30, top_p=0.95, min_p=0.02, repeat_penalty=1.2, repeat_last_n=16, seed=5)
    be = NativeBackend(tiny_chat_gguf, n_ctx=128, threads=1)
    try:
        prompt = be.tokenize("the cat sat on the mat and the")
        be.eval_logits(prompt[:-1])
        n0, last = be.n_past, prompt[-1]

        def dist(extra):
            """The target's sampler distribution after prompt + extra, as {token: p}."""
            be.truncate(n0)
            row = be.eval_logits([last, *extra])[-1]
            ids, w = _native.sampling_distribution(row, (prompt + extra)[-s.repeat_last_n:], s.temperature, s.top_k,
                                                   s.top_p, s.min_p, s.repeat_penalty, s.repeat_last_n)
            be.truncate(n0)
            return dict(zip(ids.tolist(), (w / w.sum()).tolist()))

        p1 = dist([])
        ranked = sorted(p1, key=p1.get, reverse=True)
        a = ranked[1]  # a likely but not certain first token: both acceptance and the residual happen
        p2 = dist([a])
        b = sorted(p2, key=p2.get, reverse=True)[0]

        class Fixed:
            name = "fixed"
            cheap, source = True, None

            def draft(self, context, n):
                return [a, b][:n]

            def close(self):
                pass

        spec = Speculator(be, Fixed(), 2, adaptive=False)
        spec.begin(s)
        first, second, n = {}, {}, 6000
        for _ in range(n):
            out = spec._verify([last], [a, b], [None])
            be.truncate(n0)
            first[out[0]] = first.get(out[0], 0) + 1
            if out[0] == a:
                second[out[1]] = second.get(out[1], 0) + 1
        assert _chi_square_p(*_buckets(first, p1, n)) > 1e-3
        n_a = sum(second.values())
        assert abs(n_a / n - p1[a]) < 5 * math.sqrt(p1[a] * (1 - p1[a]) / n)
        assert _chi_square_p(*_buckets(second, p2, n_a)) > 1e-3
    finally:
        be.close()


def test_stop_string_inside_an_accepted_run_rolls_back(tiny_chat_gguf):
    prompt = "a b c a b c a b c the cat the cat the"
    with edgeai.load(tiny_chat_gguf, backend="native", threads=1) as m:
        full = m.generate(prompt, max_tokens=40, temperature=0)
        stop = str(full)[len(full) // 2:len(full) // 2 + 3]
        want = m.generate(prompt, max_tokens=40, temperature=0, stop=stop)
        history = m.backend.history
    with edgeai.load(tiny_chat_gguf, backend="native", threads=1, speculative=str(tiny_chat_gguf)) as m:
        got = m.generate(prompt, max_tokens=40, temperature=0, stop=stop)
        assert str(got) == str(want)
        assert m.backend.history == history
        # a consumer that stops reading mid-run leaves the cache at the token it stopped at
        it = m.stream(prompt, max_tokens=40, temperature=0)
        seen = [next(it).token for _ in range(5)]
        it.close()
        assert m.backend.history[-4:] == seen[:4] and len(m.backend.history) == len(m.tokenize(prompt)) + 4


def test_logprobs_are_the_plain_decoders_with_a_drafter(tiny_chat_gguf):
    # logprobs need each token's own logits, so a drafter stands aside for that generation
    prompt = "a b c a b c a b c the cat the cat the"
    with edgeai.load(tiny_chat_gguf, backend="native", threads=1) as m:
        want = [c.logprobs for c in m.stream(prompt, max_tokens=12, temperature=0, logprobs=3)]
    with edgeai.load(tiny_chat_gguf, backend="native", threads=1, speculative="lookup") as m:
        got = [c.logprobs for c in m.stream(prompt, max_tokens=12, temperature=0, logprobs=3)]
        assert m.stats().extra["speculative"]["accepted"] == 0
    assert got == want and all(lp is not None for lp in got)


# ---- every tiny family, f16 and q8_0 KV --------------------------------------------------------

# head size 32 (2 heads of a 64-wide model; as many KV heads, as OLMoE needs): a q8_0 KV cache needs a multiple of 32
KV32 = dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def family_ggufs(tmp_path_factory):
    from helpers import TINY_ARCHS, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("spec-families")
    return {a.name: edgeai.convert(make_tiny_checkpoint(root / a.name, a, **KV32), root / f"{a.name}.gguf",
                                   outtype="f32") for a in TINY_ARCHS}


@pytest.mark.parametrize("arch", ["llama", "llama3", "smollm", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                                  "qwen3_moe", "olmoe"])
def test_greedy_lookup_is_token_identical_on_every_family(family_ggufs, arch):
    path = family_ggufs[arch]
    prompt = "the cat sat on the mat. the cat sat on the mat. the dog sat on the mat. the cat sat on the"
    for kv in ("f16", "q8_0"):
        want, history, _ = _plain(path, prompt, 40, kv)
        with edgeai.load(path, backend="native", threads=1, kv_cache=kv, speculative="lookup", draft_tokens=6) as m:
            m._speculator.adaptive = False  # draft on every match, however the timing goes
            got, _ = _speculative(m, prompt, 40)
            assert got == want, kv
            assert m.backend.history == history, kv
            st = m.stats().extra["speculative"]
            assert st["verifications"] > 0 and st["accepted"] > 0, kv  # rollback after accepted runs exercised


# ---- the memory plan -------------------------------------------------------------------------


def test_the_plan_counts_the_draft_model_and_the_verification():
    from edgeai.errors import BudgetError
    from edgeai.gguf_header import read_header
    from edgeai.paths import default_model_path
    from edgeai.runtimes.native import engine_config
    from edgeai.runtimes.plan import plan_memory
    from edgeai.speculative import speculative_options, speculative_memory

    path = default_model_path()  # its own draft: the same vocabulary
    header = read_header(path)
    config = engine_config(header)
    config.pop("n_ctx_train")

    def plan(budget=None, speculative=None, kv="f16"):
        extra = speculative_memory(speculative_options(speculative, None), header, config, n_ctx=1024, threads=2,
                                   kv_cache=kv)
        return plan_memory(header, config, budget=budget, n_ctx=1024, threads=2, kv_cache=kv, process_bytes=50 << 20,
                           speculative=extra)

    plain, lookup, draft = plan(), plan(speculative="lookup"), plan(speculative=str(path))
    verify = 2 * MAX_VERIFY_TOKENS * config["n_vocab"] * 4
    assert lookup.speculative.total == verify and lookup.total == plain.total + verify
    assert [r[0] for r in lookup.rows()][-1] == "verification"
    d = draft.speculative
    assert d.draft_weights == plain.dense + plain.experts and d.draft_kv == plain.kv and d.draft_n_ctx == 1024
    assert draft.total == plain.total + verify + d.draft_weights + d.draft_kv + d.draft_scratch
    assert "draft model" in [r[0] for r in draft.rows()] and draft.to_json()["parts"]["draft model"] > d.draft_weights
    q8 = plan(speculative=str(path), kv="q8_0").speculative
    assert q8.draft_kv_cache == "q8_0" and q8.draft_kv < d.draft_kv  # the draft's KV follows the target's type
    assert plan(draft.minimum, str(path)).total <= draft.minimum  # the minimum runs
    with pytest.raises(BudgetError) as err:  # enough for the target alone, not with its draft
        plan(plain.minimum + verify, str(path))
    assert err.value.minimum == draft.minimum
    assert "draft model" in str(err.value) and "speculative='lookup' (no draft model) saves" in str(err.value)


def test_load_and_plan_refuse_a_budget_too_small_for_the_draft():
    from edgeai.errors import BudgetError
    from edgeai.paths import default_model_path

    path = default_model_path()
    plain = edgeai.plan(path, n_ctx=512, threads=1)
    with_draft = edgeai.plan(path, n_ctx=512, threads=1, speculative=str(path))
    assert with_draft.speculative is not None and with_draft.minimum > plain.minimum + with_draft.speculative.draft_weights
    budget = plain.minimum + 8 * 2**20  # the target fits (with room for the process to grow a little)
    edgeai.plan(path, n_ctx=512, threads=1, memory_budget=budget)
    for call in (edgeai.plan, edgeai.load):
        with pytest.raises(BudgetError, match=r"needs at least .*draft model") as err:
            call(path, n_ctx=512, threads=1, memory_budget=budget, speculative=str(path))
        assert err.value.minimum > budget


def test_llama_cpp_refuses_every_drafter_by_name_before_loading(tiny_chat_gguf):
    for spec in ("lookup", "self", str(tiny_chat_gguf)):
        with pytest.raises(BackendError, match="the llama.cpp backend cannot speculate"):
            edgeai.load(tiny_chat_gguf, backend="llama.cpp", speculative=spec)


def test_the_cost_of_a_verification_is_learnt_for_every_size_at_once():
    """Verifications of 2 tokens that cost 1.5 plain steps each teach the slope (0.5 a token), and
    every size is costed by it: a size never verified is not taken for cheap (the per-size running
    figure it replaces either kept a stale sample or guessed 0.1 a token for sizes not yet seen)."""

    class Lookup:
        name, cheap, source = "lookup", True, 2

        def draft(self, context, n):
            return [1] * n

        def close(self):
            pass

    spec = Speculator(None, Lookup(), 8)
    spec._plain_s = 0.004
    spec._counts[2] = [9.0, 1.0]  # acceptance 0.9: drafting pays at the initial slope
    assert spec.draft_length(8, 1, source=2) == 8
    for _ in range(40):
        spec._learn(2, 1, 1, 2, 0.006, 0.0, 2)  # 2 tokens verified in 1.5 plain steps
    assert spec._slope == pytest.approx(0.5, rel=1e-3)
    expected = {k: spec._gain(k, 1, spec._acceptance(2)) for k in range(1, 9)}
    for k in (3, 8):  # sizes never verified: costed 1 + 0.5 (b - 1) plain steps
        a = min(spec._acceptance(2), 0.98)
        assert expected[k] == pytest.approx((1 - a ** (k + 1)) / (1 - a) / (1 + 0.5 * k), rel=1e-3)
    spec._counts[2] = [3.0, 7.0]  # acceptance 0.3: at 0.5 a token no draft pays
    assert spec.draft_length(8, 1, source=2) == 0
