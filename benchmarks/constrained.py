"""Structured output on the bundled SmolLM2 (49,152-token vocabulary): validity, mask cost, and
constrained decode speed against unconstrained decode and against llama-cpp-python's own grammar
path (`LlamaGrammar.from_json_schema`), side by side in one run.

Run by hand (never by tests):

    .venv/bin/python benchmarks/constrained.py [--rounds 3] [--threads 2] [--max-tokens 256]

For each of the 50 schemas below (written for this benchmark; the tests have their own), in every
round, greedy:
- edgeai: `Model.chat(messages, json_schema=SCHEMA)` on the native engine; the answer is checked
  with `jsonschema`; every mask is timed twice: what it held up the decode loop ("mask time", the
  goal's figure: a mask made in the loop, its whole time; one made while the step's forward pass ran,
  `edgeai.constraints.MaskAhead`, the step's wait for it after the forward pass; each with the
  `forces_nothing` check that chose) and its own computation, wherever it ran ("compute");
- unconstrained: the same prompt through `Model.stream` with the end-of-generation tokens ignored,
  for exactly as many tokens as the constrained answer had (equal token counts, same KV lengths);
- llama-cpp-python: `Llama.create_chat_completion(messages, grammar=LlamaGrammar.from_json_schema(...))`
  on the same file and thread count, streamed; its answer checked the same way (a schema its
  converter refuses counts as invalid).
Decode tokens/s is (tokens - 1) / (time from the first token to the last): the prefill is apart.
Reported: validity rates, mask time and compute time per mask p50/p99, and per engine the median over rounds of
the summed decode tokens/s over all schemas; ratios are of the same round. Figures and the CPU
model go to constrained.json in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from bench_common import cpu_model  # noqa: E402

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(required: dict, optional: dict | None = None) -> dict:
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required),
            "additionalProperties": False}


def s(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def rng(lo, hi, kind="integer") -> dict:
    return {"type": kind, "minimum": lo, "maximum": hi}


def arr(items: dict, lo: int = 1, hi: int = 4) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


def enum(*xs) -> dict:
    return {"enum": list(xs)}


# (prompt, schema): 50 tasks a device app might give a small model
CASES: list[tuple[str, dict]] = [
    ("Extract the person: 'Maria Lopez, 34, lives in Madrid.'", obj({"name": s(40), "age": rng(0, 130), "city": s(40)})),
    ("Give the capital of Japan.", obj({"country": s(30), "capital": s(30)})),
    ("Rate the review 'Terrible battery, great screen.'", obj({"sentiment": enum("positive", "negative", "mixed"), "score": rng(1, 5)})),
    ("Convert 3 kilometres to metres.", obj({"value": rng(0, 1e6, "number"), "unit": enum("m", "km", "cm")})),
    ("Describe today's weather in Oslo.", obj({"city": s(30), "temperature_c": rng(-60, 60, "number"), "condition": enum("sunny", "cloudy", "rain", "snow")})),
    ("List three primary colours.", obj({"colours": arr(s(12), 3, 3)})),
    ("Make a to-do item for buying milk.", obj({"title": s(50), "done": B, "priority": enum("low", "medium", "high")})),
    ("Parse the date 'March 5, 2024'.", obj({"year": rng(1900, 2100), "month": rng(1, 12), "day": rng(1, 31)})),
    ("Give a product entry for a blue mug costing 8 dollars.", obj({"name": s(40), "price": rng(0, 10000, "number"), "currency": enum("USD", "EUR", "GBP"), "colour": s(20)})),
    ("Classify the email 'You won a prize! Click here.'", obj({"label": enum("spam", "ham"), "confidence": rng(0, 1, "number")})),
    ("Summarise: 'The meeting moved to Friday at 10am in room 4.'", obj({"day": enum("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"), "time": {"type": "string", "pattern": "^[0-9]{1,2}(am|pm)$"}, "room": rng(1, 100)})),
    ("Extract the phone number from 'Call me at 555-0134.'", obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}})),
    ("Give a book recommendation.", obj({"title": s(60), "author": s(40), "year": rng(1500, 2030)})),
    ("Plan a 3-step morning routine.", obj({"steps": arr(obj({"order": rng(1, 10), "action": s(40)}), 3, 3)})),
    ("Answer yes or no: is water wet?", obj({"answer": enum("yes", "no")})),
    ("Give the coordinates of Paris.", obj({"lat": rng(-90, 90, "number"), "lon": rng(-180, 180, "number")})),
    ("Create a user profile for 'sam99'.", obj({"username": {"type": "string", "pattern": "^[a-z0-9_]{3,16}$"}, "email": {"type": "string", "format": "email"}, "active": B})),
    ("Tag the sentence 'Apple releases a new iPhone'.", obj({"topics": arr(enum("tech", "sports", "politics", "business", "science"), 1, 3)})),
    ("Give a recipe for toast.", obj({"dish": s(30), "ingredients": arr(s(20), 1, 5), "minutes": rng(1, 120)})),
    ("Translate 'hello' into French and Spanish.", obj({"french": s(20), "spanish": s(20)})),
    ("Extract the order: '2 pizzas and 1 cola for table 7'.", obj({"table": rng(1, 50), "items": arr(obj({"item": s(20), "qty": rng(1, 20)}), 1, 4)})),
    ("Give an event for a team lunch next week.", obj({"title": s(40), "date": {"type": "string", "format": "date"}, "attendees": rng(1, 100)})),
    ("What is 12 times 12?", obj({"expression": s(20), "result": I})),
    ("Describe a movie you like.", obj({"title": s(50), "genre": enum("drama", "comedy", "action", "horror", "sci-fi"), "rating": rng(0, 10, "number")})),
    ("Fill in an address for the White House.", obj({"street": s(50), "city": s(30), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, {"country": s(30)})),
    ("Detect the language of 'Guten Morgen'.", obj({"language": enum("English", "German", "French", "Spanish", "Italian"), "iso": {"type": "string", "pattern": "^[a-z]{2}$"}})),
    ("Give a password policy.", obj({"min_length": rng(4, 64), "needs_digit": B, "needs_symbol": B})),
    ("Name two planets and their order from the sun.", obj({"planets": arr(obj({"name": s(15), "order": rng(1, 8)}), 2, 2)})),
    ("Give a short bio of a fictional engineer.", obj({"name": s(40), "skills": arr(s(20), 1, 4)}, {"years": rng(0, 60)})),
    ("Report a bug: the app crashes on login.", obj({"title": s(60), "severity": enum("low", "medium", "high", "critical"), "component": s(30)})),
    ("Give the opening hours of a bakery.", obj({"open": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}, "close": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}})),
    ("Estimate the population of Canada.", obj({"country": s(30), "population_millions": rng(0, 2000, "number")})),
    ("Give a flashcard about photosynthesis.", obj({"question": s(80), "answer": s(80)})),
    ("Schedule a reminder to call mom in 2 hours.", obj({"text": s(40), "in_minutes": rng(1, 10000)})),
    ("Give a chess opening.", obj({"name": s(40), "moves": arr({"type": "string", "pattern": "^[a-hKQRBN][a-h1-8x+#=]{1,5}$"}, 1, 4)})),
    ("Pick a random fruit.", obj({"fruit": enum("apple", "banana", "cherry", "mango", "pear")})),
    ("Give the nutrition of an egg.", obj({"calories": rng(0, 1000), "protein_g": rng(0, 100, "number"), "fat_g": rng(0, 100, "number")})),
    ("Extract the invoice: 'Invoice 2291, total 45.50 EUR, due 2024-06-01'.", obj({"number": I, "total": N, "currency": enum("USD", "EUR"), "due": {"type": "string", "format": "date"}})),
    ("Describe a cat.", obj({"name": s(20), "age": rng(0, 30), "indoor": B}, {"colour": s(20)})),
    ("Give an HTTP status for 'not found'.", obj({"code": rng(100, 599), "reason": s(30)})),
    ("Make a git commit message for fixing a typo.", obj({"type": enum("fix", "feat", "docs", "chore"), "subject": s(60)})),
    ("Give a workout: 3 exercises.", obj({"exercises": arr(obj({"name": s(25), "reps": rng(1, 100)}), 3, 3)})),
    ("Return the RGB of pure red.", obj({"r": rng(0, 255), "g": rng(0, 255), "b": rng(0, 255)})),
    ("Give a train connection from Berlin to Munich.", obj({"from": s(30), "to": s(30), "duration_h": rng(0, 24, "number"), "changes": rng(0, 5)})),
    ("List up to four synonyms of 'happy'.", obj({"word": s(20), "synonyms": arr(s(15), 1, 4)})),
    ("Give a SQL query intent for 'count users'.", obj({"action": enum("select", "insert", "update", "delete"), "table": s(20), "aggregate": enum("count", "sum", "none")})),
    ("Make a calendar entry for a dentist appointment.", obj({"what": s(40), "when": {"type": "string", "format": "date-time"}})),
    ("Describe a smartphone.", obj({"brand": s(20), "storage_gb": enum(64, 128, 256, 512), "price": rng(0, 3000, "number")})),
    ("Give the boiling point of water.", obj({"celsius": rng(-100, 1000, "number"), "fahrenheit": rng(-200, 2000, "number")})),
    ("Give two facts about the Moon.", obj({"facts": arr(s(80), 2, 2), "distance_km": rng(0, 1e6, "number")})),
]
assert len(CASES) == 50




def valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def decode_tps(times: list[float]) -> tuple[int, float]:
    """(tokens, seconds from the first token to the last) of one streamed answer."""
    return len(times), (times[-1] - times[0]) if len(times) > 1 else 0.0


def run_edgeai(model, prompt: str, schema: dict, max_tokens: int, mask_times: list[float],
               waits: list[float] | None = None) -> dict:
    """One constrained chat. mask_times gets each mask's computation time, wherever it ran; waits,
    the time each mask held up the decode loop: a mask computed in the loop's thread, its whole time;
    one made while the step's forward pass ran (`MaskAhead`), the time the step waited for it after
    its forward pass; each plus the `forces_nothing` check that chose between the two."""
    from edgeai.constraints import MaskAhead, Matcher

    timed, timed_check, timed_words = Matcher.mask, Matcher.forces_nothing, MaskAhead.words
    loop_thread, check_s = threading.get_ident(), [0.0]
    waits = [] if waits is None else waits

    def mask(self):
        t0 = time.perf_counter()
        out = timed(self)
        mask_times.append(time.perf_counter() - t0)
        if threading.get_ident() == loop_thread:
            waits.append(mask_times[-1] + check_s[0])
            check_s[0] = 0.0
        return out

    def forces_nothing(self):
        t0 = time.perf_counter()
        out = timed_check(self)
        check_s[0] += time.perf_counter() - t0
        return out

    def words(self):
        t0 = time.perf_counter()
        out = timed_words(self)
        if not getattr(self, "waited", False):  # its first call, from the step; a second reuses it
            self.waited = True
            waits.append(time.perf_counter() - t0 + check_s[0])
            check_s[0] = 0.0
        return out

    Matcher.mask, Matcher.forces_nothing, MaskAhead.words = mask, forces_nothing, words
    be = model.backend
    step, steps = be.step, [0]

    def counted(tokens, mask=None, **kw):
        steps[0] += 1
        return step(tokens, mask, **kw)

    be.step = counted
    try:
        chunks, stamps = [], []
        for c in model.chat([{"role": "user", "content": prompt}], json_schema=schema, max_tokens=max_tokens,
                            temperature=0, stream=True):
            chunks.append(c)
            # decode: tokens after the prefill step (forced tokens before it are written while the prompt
            # is not yet evaluated; counting from them would put the prefill into the decode time)
            if c.token is not None and c.timings.prompt_seconds > 0:
                stamps.append(time.perf_counter())
    finally:
        Matcher.mask, Matcher.forces_nothing, MaskAhead.words = timed, timed_check, timed_words
        del be.step
    text = "".join(c.text for c in chunks)
    n, secs = decode_tps(stamps)
    total = sum(1 for c in chunks if c.token is not None)
    return {"text": text, "valid": not chunks[-1].incomplete and valid(text, schema), "tokens": n, "seconds": secs,
            "steps": steps[0], "all_tokens": total}


def run_free(model, prompt: str, n_tokens: int) -> dict:
    """The same prompt unconstrained, exactly n_tokens (end-of-generation tokens are not stops here)."""
    be = model.backend
    eog, be.eog_ids = be.eog_ids, frozenset()
    try:
        tokens = model.chat_tokens([{"role": "user", "content": prompt}])
        stamps = [time.perf_counter() for c in model.stream(tokens, max_tokens=n_tokens, temperature=0) if c.token is not None]
    finally:
        be.eog_ids = eog
    n, secs = decode_tps(stamps)
    return {"tokens": n, "seconds": secs}


def run_llama(llm, prompt: str, schema: dict, max_tokens: int) -> dict:
    from llama_cpp import LlamaGrammar

    try:
        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:  # its converter refuses some schema features
        return {"text": "", "valid": False, "tokens": 0, "seconds": 0.0, "error": str(exc)[:120]}
    llm.reset()
    stamps, pieces = [], []
    for part in llm.create_chat_completion([{"role": "user", "content": prompt}], grammar=grammar, max_tokens=max_tokens,
                                           temperature=0, stream=True):
        delta = part["choices"][0]["delta"].get("content")
        if delta:
            pieces.append(delta)
            stamps.append(time.perf_counter())
    text = "".join(pieces)
    n, secs = decode_tps(stamps)
    return {"text": text, "valid": valid(text, schema), "tokens": n, "seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--cases", type=int, default=len(CASES), help="use the first N schemas (quick looks)")
    ap.add_argument("--out", type=Path, default=Path("build/bench"))
    args = ap.parse_args()

    import numpy as np
    from llama_cpp import Llama

    import edgeai
    from edgeai.paths import default_model_path

    path = default_model_path()
    cases = CASES[:args.cases]
    model = edgeai.load(path, backend="native", threads=args.threads, n_ctx=1024)
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    for prompt, schema in cases[:2]:  # warm-up: tokenizer tables, caches, lazy set-up
        run_edgeai(model, prompt, schema, 32, [])
        run_llama(llm, prompt, schema, 32)

    rounds, mask_times, waits = [], [], []
    for r in range(args.rounds):
        per = {"edgeai": [], "free": [], "llama": []}
        for prompt, schema in cases:
            ours = run_edgeai(model, prompt, schema, args.max_tokens, mask_times, waits)
            per["edgeai"].append(ours)
            per["free"].append(run_free(model, prompt, ours["all_tokens"]))
            per["llama"].append(run_llama(llm, prompt, schema, args.max_tokens))

        def tps(rows):
            toks = sum(x["tokens"] - 1 for x in rows if x["tokens"] > 1)
            secs = sum(x["seconds"] for x in rows if x["tokens"] > 1)
            return toks / secs if secs else 0.0

        rounds.append({k: {"tps": tps(v), "valid": sum(x.get("valid", True) for x in v) / len(v)} for k, v in per.items()})
        rounds[-1]["forced"] = 1 - sum(x["steps"] for x in per["edgeai"]) / sum(x["all_tokens"] for x in per["edgeai"])
        rounds[-1]["examples"] = {"edgeai": per["edgeai"][0]["text"], "llama": per["llama"][0]["text"]}
        rounds[-1]["invalid"] = {"edgeai": [i for i, x in enumerate(per["edgeai"]) if not x["valid"]],
                                 "llama": [i for i, x in enumerate(per["llama"]) if not x["valid"]]}
        print(f"round {r + 1}: edgeai {rounds[-1]['edgeai']['tps']:.1f} tok/s, unconstrained "
              f"{rounds[-1]['free']['tps']:.1f}, llama-cpp-python grammar {rounds[-1]['llama']['tps']:.1f}", flush=True)

    med = lambda xs: statistics.median(xs)
    ms, ws = np.array(mask_times) * 1e6, np.array(waits) * 1e6
    result = {
        "cpu": cpu_model(), "threads": args.threads, "schemas": len(cases), "rounds": args.rounds,
        "validity": {"edgeai": med([r["edgeai"]["valid"] for r in rounds]), "llama_cpp_grammar": med([r["llama"]["valid"] for r in rounds])},
        "invalid_cases": rounds[-1]["invalid"],
        "forced_token_share": med([r["forced"] for r in rounds]),  # tokens appended without a step of their own
        # the decode loop's time per mask (the goal's figure): made during the step, only what it waited
        "mask_us": {"p50": float(np.percentile(ws, 50)), "p99": float(np.percentile(ws, 99)), "max": float(ws.max()), "n": int(ws.size)},
        # each mask's own computation time, wherever it ran
        "mask_compute_us": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
                            "n": int(ms.size)},
        "decode_tps": {"edgeai_constrained": med([r["edgeai"]["tps"] for r in rounds]),
                       "edgeai_unconstrained": med([r["free"]["tps"] for r in rounds]),
                       "llama_cpp_grammar": med([r["llama"]["tps"] for r in rounds])},
        "ratio": {"constrained_vs_unconstrained": med([r["edgeai"]["tps"] / r["free"]["tps"] for r in rounds]),
                  "edgeai_vs_llama_cpp_grammar": med([r["edgeai"]["tps"] / r["llama"]["tps"] for r in rounds])},
        "example": rounds[-1]["examples"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "constrained.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "example"}, indent=2))


if __name__ == "__main__":
    main()
