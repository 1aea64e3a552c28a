"""Expert streaming under hard memory limits: edgeai's native engine against llama.cpp (mmap).

The benchmark issue 7 asks for, and issue 20 on a gpt-oss-shaped file. Run it by hand (it is not a
test; it needs root for the memory cgroups, about 5 GB of disk and 20-30 minutes):

    sudo .venv/bin/python benchmarks/expert_streaming.py            # everything, table + JSON
    .venv/bin/python benchmarks/expert_streaming.py --show           # print the last report again
    sudo .venv/bin/python benchmarks/expert_streaming.py --alignment-ab   # 4 KiB- vs 32-byte-aligned file
    sudo .venv/bin/python benchmarks/expert_streaming.py --shape gpt-oss --limits 0.5,0.2   # MXFP4 experts

What it does:
1. Model: writes an MoE GGUF of about 2.2 GB in Qwen3-MoE shape (architecture `qwen3moe`: n_embd
   2048, 12 layers, 64 experts of which 8 are used, expert FFN 768 = Qwen3-30B-A3B's expert size,
   16 query / 2 KV heads of 128, tied embedding) with random weights: experts, attention and the
   embedding Q4_0 (random codes, small fp16 scales so that activations stay finite), norms and
   router F32; vocabulary and tokenizer copied from the bundled SmolLM2 GGUF. Two variants: one
   aligned to 4 KiB (`general.alignment` 4096, so every expert slice starts on a page) and one at
   GGUF's default 32-byte alignment (reads must be rounded out). Both are cached in --work. The
   file is proven by llama.cpp loading it and by greedy tokens of llama.cpp and of our engine
   (unconstrained and streaming at the smallest budget) after the same prompt.
   --shape gpt-oss writes the other model (`Shape`, SHAPES): architecture `gpt-oss` planned by its
   converter spec, gpt-oss-20b's 24 layers, 32 experts of which 4 are used, alternating 128-position
   sliding-window and full layers, attention sinks, biases on attention, router and experts, YaRN,
   an untied output; n_embd = expert FFN 1280 (2880 in gpt-oss-20b) and 32 query / 4 KV heads of 64
   (64 / 8), so the file is 2.17 GB, 92 % of it experts. The experts are MXFP4 (random E2M1 codes,
   whose table is symmetric: mean 0; E8M0 exponents drawn so the weights' mean square is the
   target), everything else as in the Qwen3-MoE file (Q4_0; norms, router, biases, sinks F32).
   Weights are scaled as GPT-2 initialises them (see SHAPES): at gain 1 this random gpt-oss graph is
   chaotic: llama.cpp with and without its repacked kernels disagrees with itself. Its report is
   WORK/report-gpt-oss.json.
2. Disk: random O_DIRECT reads of whole expert slices (one projection of one expert, the unit the
   store reads) of this file, by 1 and by 4 threads (the store's reader count), after evicting the
   file from the page cache.
3. Runs: for each limit (75 %, 50 %, 20 % of the file size) and engine, --runs child processes,
   each inside a fresh memory cgroup with that hard limit (devices.cgroup.run_limited: process
   memory and its page cache are charged), after the file is dropped from the page cache:
   (a) ours: NativeBackend(memory_budget=limit) (the planner splits it), (b) llama.cpp via
   llama-cpp-python with its defaults: it maps the file, but its CPU backend then repacks the Q4_0
   weights into anonymous memory (the whole model), (c) "llama.cpp mmap": the same with repacking
   off (model parameter use_extra_bufts = false), so that it computes from the memory map and the
   kernel pages the file in and out, the behaviour the issue describes. Same threads (--threads,
   default 1: with 2 threads on a loaded 2-core machine both engines' thread pools lose most of
   their time to waiting for a descheduled worker). Each child evaluates the prompt, then
   decodes one token per step (see --decode) and times every step; llama.cpp stops at --llama-cap
   seconds of decoding. Bytes read: /proc/self/io read_bytes of the child (both engines; O_DIRECT
   reads are counted there too), and for ours the store's own count. At 50 % and 20 % ours also runs
   under each replacement policy (--policies; "next-use:demand" is next-use with prefetch off, the
   run whose hit rate compares with Belady's on equal terms). Unconstrained runs (no limit, file in the page cache)
   give the reference speed of each engine.
4. For ours: hit rate of decode against offline replays (runtimes/expert_replay.py: Belady, LRU,
   LFU) of its own demand trace at the same slot count, replayed from the start of the run (prefill
   included, so both caches are equally warm) and counted over the decode steps; per-layer hit
   rates; prefetch precision (prefetch_used / prefetch_issued) and recall (prefetch_used /
   (prefetch_used + misses)); stall time (the forward pass waiting for reads).

--decode text (default) feeds the tokens of a fixed English text one per step (teacher forcing):
the weights are random, so greedy decoding falls into repeating one token, which routes every step
to the same experts and would make any cache look perfect. Each step is the same work as a greedy
step (one token through the whole model, logits, sampling). --decode greedy is there to see that.

Figures: tokens/s is the median over runs of (decode steps / their summed wall time); bytes per
token and bandwidth are medians too; hit rates and the rest come from the median run (by tok/s).
Everything is written to WORK/report.json (report-gpt-oss.json for --shape gpt-oss); the table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WORK = Path.home() / ".cache" / "edgeai-bench" / "expert-streaming"


@dataclass(frozen=True)
class Shape:
    """The benchmark model of one --shape: sizes, weight formats, and the hyper-parameters the
    architecture's converter spec (edgeai.architectures.SPECS) plans its tensors and metadata from."""

    name: str  # --shape
    arch: str  # GGUF architecture, one of SPECS' gguf_arch
    n_embd: int
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_head: int
    n_head_kv: int
    head_dim: int
    expert_format: str  # FORMATS key of the stacked expert matrices; every other matrix is Q4_0
    file_type: int  # general.file_type (llama.cpp's LlamaFileType of the mix)
    file_stem: str  # cached as {file_stem}-align{alignment}.gguf in --work
    # Scales of the random weights. Every matrix has weights of rms gain/sqrt(its input width), gain 1
    # (outputs keep the input's scale) but for the output matrix (4: logits spread of ~4), an untied
    # embedding (embedding_rms: the rms of its entries) and the matrices that write into the residual
    # stream, the attention output and the experts' down (branch_gain).
    embedding_rms: float = 1.0
    branch_gain: float = 1.0
    extra: dict = field(default_factory=dict)  # the rest of HParams (rope, window, biases, tying)

    def hparams(self, n_vocab: int):
        from edgeai.architectures import HParams

        return HParams(n_vocab=n_vocab, n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head,
                       n_head_kv=self.n_head_kv, head_dim=self.head_dim, n_expert=self.n_expert,
                       n_expert_used=self.n_expert_used, n_ff_exp=self.n_ff_exp, **self.extra)

    def policies(self) -> tuple[str, ...]:
        # next-use: on main since 5f9bd0e (a failed row on older engines); ":demand" runs a policy without
        # prefetching, so that its hit rate compares with the demand-only replays on equal terms; ":topN"
        # prefetches the N likeliest experts (the engine's default: half of the experts a token uses)
        return ("lru", "lfu", "layer", "next-use", "next-use:demand", f"next-use:top{self.n_expert_used}")


SHAPES = {
    # Qwen3-30B-A3B's expert size and routing, 12 layers: 2.2 GB
    "qwen3moe": Shape("qwen3moe", "qwen3moe", n_embd=2048, n_layer=12, n_expert=64, n_expert_used=8, n_ff_exp=768,
                      n_head=16, n_head_kv=2, head_dim=128, expert_format="q4_0", file_type=2,  # MOSTLY_Q4_0
                      file_stem="qwen3moe-2gb-q4_0-zm",
                      extra=dict(n_ff=6144, n_ctx_train=4096, rope_theta=1e6, rms_eps=1e-6, rope_scaling=None,
                                 tie_embeddings=True, attention_bias=False, norm_topk_prob=True)),
    # gpt-oss-20b's 24 layers, 32 experts, top-4 routing, attention sinks and biases, every other layer a
    # 128-position sliding window, YaRN (factor 32 over 4096) on rope base 150000, untied output; widths
    # shrunk (n_embd = expert FFN 2880 -> 1280, 64/8 heads of 64 -> 32/4) so the file is about 2 GB.
    # Weights scaled as GPT-2 initialises them (embeddings of rms 1, residual branches 1/sqrt(2 n_layer)):
    # with every branch at gain 1 this random graph is chaotic, a rounding difference (llama.cpp with
    # and without its repacked Q4_0 kernels) changes the argmax at 14 of 32 positions, so no two engines
    # could agree on greedy tokens
    "gpt-oss": Shape("gpt-oss", "gpt-oss", n_embd=1280, n_layer=24, n_expert=32, n_expert_used=4, n_ff_exp=1280,
                     n_head=32, n_head_kv=4, head_dim=64, expert_format="mxfp4", file_type=38,  # MOSTLY_MXFP4_MOE
                     file_stem="gpt-oss-2gb-mxfp4", embedding_rms=1.0, branch_gain=1 / math.sqrt(2 * 24),
                     extra=dict(n_ff=1280, n_ctx_train=131072, rope_theta=150000.0, rms_eps=1e-5,
                                rope_scaling={"rope_type": "yarn", "factor": 32.0,
                                              "original_max_position_embeddings": 4096},
                                tie_embeddings=False, attention_bias=True, norm_topk_prob=True,
                                sliding_window=128, swa_pattern=2, rope_theta_swa=150000.0)),
}
PROMPT = "The history of the printing press begins in"
# Teacher-forced decode text (--decode text): ordinary prose, so consecutive tokens differ.
TEXT = ("The printing press changed how knowledge travelled across Europe. Before it, books were copied by "
        "hand in monasteries and workshops, slowly and at great cost, and a single error could spread through "
        "every copy made from a faulty page. Movable metal type made it possible to set a page once and print "
        "hundreds of identical sheets in a day. Within fifty years presses were working in more than two "
        "hundred cities, and the price of a book fell so far that merchants, students and craftsmen could own "
        "them. Pamphlets, calendars, maps and news sheets followed, and with them new readers, new arguments "
        "and new ways of checking what others had written.")
LIMITS = (0.75, 0.5, 0.2)
POLICY_LIMITS = (0.5, 0.2)  # where every replacement policy runs (Shape.policies)
ENGINES = {"ours": "ours", "llama": "llama.cpp", "llama-mmap": "llama.cpp mmap"}  # child name -> row name
N_CTX = 256
Q4_RMS = math.sqrt(17.5)  # rms of the weights -7..7 (and 0 twice) that q4_blocks writes, in units of the scale
# rms of MXFP4's 16 E2M1 values, doubled as quant.blocks.E2M1_DOUBLED holds them (0, +-1, +-2, +-3, +-4, +-6,
# +-8, +-12; 0 twice): uniform random codes give weights of this rms times 2^(e-128) for the E8M0 byte e
MXFP4_RMS = math.sqrt(34.25)


# --- 1. the model ----------------------------------------------------------------------------------

def model_path(work: Path, alignment: int, shape: Shape = SHAPES["qwen3moe"]) -> Path:
    return work / f"{shape.file_stem}-align{alignment}.gguf"


def make_model(dest: Path, alignment: int, seed: int = 0, shape: Shape = SHAPES["qwen3moe"]) -> Path:
    """Write the benchmark MoE of `shape` (see the module docstring) to `dest` unless it is there already."""
    from gguf import GGMLQuantizationType, GGUFValueType

    from edgeai.gguf_writer import GGUFWriter
    from edgeai.converters.sources import GGUFSource
    from edgeai.architectures import SPECS
    from edgeai.paths import atomic_output, default_model_path
    from edgeai.quant.formats import FORMATS

    if dest.exists():
        return dest
    source = GGUFSource(default_model_path())
    meta = source.metadata()
    tok_keys = [k for k in meta if k.startswith("tokenizer.")]
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    spec = next(s for s in SPECS if s.gguf_arch == shape.arch)
    hp = shape.hparams(n_vocab)
    planned = spec.plan(hp)
    q4, f32, experts = FORMATS["q4_0"], FORMATS["f32"], FORMATS[shape.expert_format]

    def fmt_of(name: str, dims: tuple[int, ...]):
        if len(dims) == 1 or name.endswith(".bias") or "ffn_gate_inp" in name:
            return f32  # norms, router, biases (gpt-oss's expert biases are [n_expert, rows]), sinks
        return experts if "_exps." in name else q4

    rng = np.random.default_rng(seed)

    def q4_blocks(n_blocks: int, cols: int, gain: float) -> np.ndarray:
        """Random Q4_0 blocks whose weights have rms gain/sqrt(cols): outputs keep the input's scale."""
        blocks = np.empty((n_blocks, 18), dtype=np.uint8)
        codes = np.frombuffer(rng.bytes(n_blocks * 16), dtype=np.uint8).reshape(n_blocks, 16)
        lo, hi = codes & 0x0F, codes & 0xF0
        # code 0 (weight -8) becomes 8 (weight 0): weights -7..7 and 0 twice, mean 0. Codes uniform on
        # 0..15 have mean -0.5: every output then shares a component along the all-ones direction
        # that grows layer by layer until it alone decides the routing (every token, same experts).
        blocks[:, 2:] = np.where(lo == 0, 0x08, lo) | np.where(hi == 0, 0x80, hi)
        d = gain / (Q4_RMS * math.sqrt(cols)) * rng.uniform(0.8, 1.2, n_blocks)
        blocks[:, :2] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        return blocks

    def mxfp4_blocks(n_blocks: int, cols: int, gain: float) -> np.ndarray:
        """Random MXFP4 blocks whose weights have rms gain/sqrt(cols), as q4_blocks.

        Uniform codes need no correction: E2M1's table is symmetric (each value with its negative, +0
        and -0), so the weights' mean is 0. The scale is a power of two: each block takes 2^lo or
        2^(lo+1), the larger with the probability that makes the mean square weight the target's."""
        blocks = np.empty((n_blocks, 17), dtype=np.uint8)
        blocks[:, 1:] = np.frombuffer(rng.bytes(n_blocks * 16), dtype=np.uint8).reshape(n_blocks, 16)
        half_scale = gain / (MXFP4_RMS * math.sqrt(cols))  # the wanted 2^(e-128) (quant.blocks.e8m0_half)
        lo = math.floor(math.log2(half_scale))
        p_up = (half_scale ** 2 / 4.0 ** lo - 1) / 3  # (1 - p) 4^lo + p 4^(lo+1) = half_scale^2
        blocks[:, 0] = 128 + lo + (rng.random(n_blocks) < p_up)
        return blocks

    def f32_values(name: str, dims: tuple[int, ...]) -> np.ndarray:
        if "ffn_gate_inp.weight" in name:  # router: logits of unit scale for a normalised input
            return (rng.standard_normal(dims) / math.sqrt(dims[-1])).astype(np.float32)
        if "attn_sinks" in name:  # one logit per head in each softmax's denominator, as large as a score
            return rng.standard_normal(dims).astype(np.float32)
        if name.endswith(".bias"):  # small next to the unit-scale outputs they are added to
            return (0.1 * rng.standard_normal(dims)).astype(np.float32)
        return np.ones(dims, dtype=np.float32)  # norms

    def chunks(name: str, dims: tuple[int, ...]):
        fmt = fmt_of(name, dims)
        if fmt is f32:
            yield f32_values(name, dims)
            return
        blocks = mxfp4_blocks if fmt.name == "mxfp4" else q4_blocks
        cols = dims[-1]
        if name == "output.weight" or (name == "token_embd.weight" and hp.tie_embeddings):
            gain = 4.0
        elif name == "token_embd.weight":
            gain = shape.embedding_rms * math.sqrt(cols)
        elif "attn_output" in name or "ffn_down" in name:
            gain = shape.branch_gain
        else:
            gain = 1.0
        per = int(np.prod(dims[-2:])) // 32  # blocks of one matrix (one expert of a stacked tensor)
        for _ in range(int(np.prod(dims[:-2])) if len(dims) == 3 else 1):
            yield blocks(per, cols, gain)

    dest.parent.mkdir(parents=True, exist_ok=True)
    arch = shape.arch
    with atomic_output(dest, force=False) as tmp, open(tmp, "wb") as out:
        w = GGUFWriter(out, alignment=alignment)
        w.add("general.architecture", arch)
        w.add("general.name", f"edgeai expert-streaming benchmark (random {spec.family} shape)")
        w.add("general.file_type", shape.file_type, GGUFValueType.UINT32)
        w.add("general.quantization_version", 2, GGUFValueType.UINT32)
        for key, value in spec.gguf_kv(hp).items():
            w.add(f"{arch}.{key}", value)
        for key in tok_keys:
            vtype, sub = source.value_type(key)
            w.add(key, meta[key], vtype, sub if vtype == GGUFValueType.ARRAY else None)
        for t in planned:
            fmt = fmt_of(t.name, t.shape)
            w.add_tensor(t.name, t.shape, GGMLQuantizationType(fmt.ggml_type), fmt.nbytes(int(np.prod(t.shape))))
        w.write_header()
        for t in planned:
            w.write_tensor_chunks(t.name, chunks(t.name, t.shape))
        w.finish()
    source.close()
    return dest


def expert_slices(path: Path) -> list[tuple[int, int]]:
    """(absolute file offset, bytes) of every expert's slice of every stacked expert matrix (not the
    experts' biases: the engine keeps them in memory)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = []
    for t in reader.tensors:
        if "_exps.weight" in t.name:
            n_expert = int(t.shape[-1])
            per = int(t.n_bytes) // n_expert
            out += [(int(t.data_offset) + e * per, per) for e in range(n_expert)]
    return out


# --- 2. the disk -----------------------------------------------------------------------------------

def disk_bandwidth(path: Path, threads: int, seconds: float = 6.0, seed: int = 1) -> dict:
    """Random O_DIRECT reads of whole expert slices (rounded out to 4 KiB) by `threads` readers."""
    import mmap

    from edgeai.devices.cgroup import drop_file_cache

    slices = expert_slices(path)
    order = np.random.default_rng(seed).permutation(len(slices)).tolist()  # each slice at most once
    drop_file_cache(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    lock = threading.Lock()
    done = {"bytes": 0, "reads": 0}
    widest = max(n for _, n in slices) + 8192
    stop_at = time.perf_counter() + seconds

    def reader() -> None:
        buf = mmap.mmap(-1, widest)  # page aligned, as O_DIRECT needs
        view = memoryview(buf)
        while time.perf_counter() < stop_at:
            with lock:
                if not order:
                    break
                off, n = slices[order.pop()]
            start, end = off & ~4095, (off + n + 4095) & ~4095
            got = os.preadv(fd, [view[: end - start]], start)
            with lock:
                done["bytes"] += got
                done["reads"] += 1
        view.release()
        buf.close()

    t0 = time.perf_counter()
    pool = [threading.Thread(target=reader) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    os.close(fd)
    return {"threads": threads, "reads": done["reads"], "bytes": done["bytes"], "seconds": elapsed,
            "slice_bytes": slices[0][1], "bandwidth": done["bytes"] / elapsed}


# --- 3. the child processes ------------------------------------------------------------------------

def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _memory() -> dict:
    """The child's peak resident set (VmHWM) and its cgroup's split into anonymous and page cache."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out["vm_hwm"] = int(line.split()[1]) * 1024
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        folder = None
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
        elif controllers == "" and (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.stat").exists():
            folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
        if folder is not None and (folder / "memory.stat").exists():
            stat = dict(x.split() for x in (folder / "memory.stat").read_text().splitlines())
            out["cgroup_anon"] = int(stat.get("rss", stat.get("anon", 0)))
            out["cgroup_cache"] = int(stat.get("cache", stat.get("file", 0)))
            break
    return out


def _decode_tokens(tokenize, mode: str, n: int) -> list[int] | None:
    """Tokens fed one per step (text mode), None for greedy."""
    if mode == "greedy":
        return None
    ids = tokenize(" " + TEXT)
    if len(ids) < n:
        raise SystemExit(f"the decode text has {len(ids)} tokens, fewer than --tokens {n}")
    return ids[:n]


def child_ours(a: argparse.Namespace) -> dict:
    from edgeai.runtimes.base import Sampling
    from edgeai.runtimes.native import NativeBackend

    io0, t0 = _read_bytes(), time.perf_counter()
    store = {"trace": True}
    # "next-use:demand": no prefetch, demand reads only; "next-use:top2": prefetch the 2 likeliest experts
    policy, _, mode = a.policy.partition(":")
    if policy:
        store["policy"] = policy
    if mode == "demand":
        store["prefetch"] = False
    elif mode.startswith("top"):
        store["prefetch_top"] = int(mode[3:])
    be = NativeBackend(Path(a.model), n_ctx=N_CTX, threads=a.threads, memory_budget=a.budget or None,
                       expert_store=store)
    be.set_sampling(Sampling(temperature=0))
    prompt = be.tokenize(PROMPT)
    forced = _decode_tokens(lambda s: be.tokenize(s, add_special=False), a.decode, a.tokens)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tok = be.step(prompt)
    prefill_s = time.perf_counter() - t1
    s_prefill = be.stats().extra["expert_store"]
    n_trace_prefill = len(be.expert_trace())
    io1 = _read_bytes()
    steps, out = [], []
    for i in range(a.tokens):
        feed = forced[i] if forced else tok
        t = time.perf_counter()
        tok = be.step([feed])
        steps.append(time.perf_counter() - t)
        out.append(int(tok))
        if sum(steps) > a.cap:
            break
    io2 = _read_bytes()
    s_end = be.stats().extra["expert_store"]
    trace = be.expert_trace()
    plan = be.plan.to_json()
    return {"engine": "ours", "load_s": load_s, "prefill_s": prefill_s, "prompt_tokens": len(prompt),
            "steps": steps, "tokens": out, "read_bytes_load": io1 - io0, "read_bytes_decode": io2 - io1,
            "store_prefill": s_prefill, "store_end": s_end, "trace": trace, "trace_prefill": n_trace_prefill,
            "plan": plan, "memory": _memory()}


@contextlib.contextmanager
def _llama_repack(on: bool):
    """Llama() models made inside with llama.cpp's repacked CPU weights on (its default) or off.

    llama.cpp's CPU backend repacks Q4_0 weights (AVX2: interleaved rows) into anonymous memory by
    default, so nothing of them is read from the memory map afterwards; with the extra buffer types
    off (model parameter use_extra_bufts) it computes from the mmap (what the issue calls llama.cpp's
    way). Llama() takes no option for it: its default model parameters are patched."""
    import llama_cpp

    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = default_params()
        params.use_extra_bufts = False
        return params

    if not on:
        llama_cpp.llama_cpp.llama_model_default_params = no_repack
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params


def child_llama(a: argparse.Namespace) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    io0, t0 = _read_bytes(), time.perf_counter()
    with _llama_repack(a.child != "llama-mmap"):
        llm = Llama(model_path=a.model, n_ctx=N_CTX, n_batch=64, n_threads=a.threads, n_threads_batch=a.threads,
                    verbose=False)
    n_vocab = llm.n_vocab()
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    forced = _decode_tokens(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), a.decode, a.tokens)
    load_s = time.perf_counter() - t0

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    t1 = time.perf_counter()
    llm.eval(prompt)
    tok = argmax()
    prefill_s = time.perf_counter() - t1
    io1 = _read_bytes()
    steps, out = [], []
    for i in range(a.tokens):
        feed = forced[i] if forced else tok
        t = time.perf_counter()
        llm.eval([feed])
        tok = argmax()
        steps.append(time.perf_counter() - t)
        out.append(tok)
        if sum(steps) > a.cap:
            break
    io2 = _read_bytes()
    return {"engine": a.child, "load_s": load_s, "prefill_s": prefill_s, "prompt_tokens": len(prompt),
            "steps": steps, "tokens": out, "read_bytes_load": io1 - io0, "read_bytes_decode": io2 - io1,
            "memory": _memory()}


def run_child(engine: str, model: Path, limit: int | None, args: argparse.Namespace, *, policy: str = "",
              tokens: int, cap: float, drop: bool = True) -> dict:
    """One run of `engine` in a child process, under a hard memory limit when `limit` is given."""
    from edgeai.devices.cgroup import drop_file_cache, run_limited

    out = args.work / "child.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--model", str(model), "--out", str(out),
           "--threads", str(args.threads), "--tokens", str(tokens), "--cap", str(cap), "--decode", args.decode,
           "--budget", str(limit or 0), "--policy", policy]
    if drop:
        drop_file_cache(model)
    # no limit: a cgroup far above the machine's needs, so that its peak is still measured
    run = run_limited(cmd, limit or 64 * 2**30, timeout=cap * 3 + 300, cwd="/tmp")
    result = json.loads(out.read_text()) if out.exists() and run.returncode == 0 else {}
    result.update(limit=limit, peak=run.peak, oom_killed=run.oom_killed, returncode=run.returncode,
                  wall_s=run.seconds, policy=policy, engine=engine)
    if run.returncode != 0:
        result["stderr"] = run.stderr[-2000:]
    return result


# --- 4. figures ------------------------------------------------------------------------------------

def figures(r: dict, disk_bw: float, shape: Shape) -> dict:
    """One run's figures (tok/s, bytes per token, bandwidth, hit rates...)."""
    from edgeai.runtimes import expert_replay

    steps = r.get("steps") or []
    if not steps:
        return {"ok": False}
    dt = sum(steps)
    n = len(steps)
    f = {"ok": True, "tok_s": n / dt, "steps": n, "decode_s": dt, "peak": r["peak"], "oom": r["oom_killed"],
         "io_bytes_per_tok": r["read_bytes_decode"] / n, "io_bw": r["read_bytes_decode"] / dt,
         "load_s": r["load_s"], "prefill_s": r["prefill_s"], "vm_hwm": r.get("memory", {}).get("vm_hwm", 0),
         "cgroup_anon_end": r.get("memory", {}).get("cgroup_anon", 0)}
    f["io_bw_of_disk"] = f["io_bw"] / disk_bw
    st0, st1 = r.get("store_prefill") or {}, r.get("store_end") or {}
    if st1.get("streaming"):
        d = {k: st1[k] - st0.get(k, 0) for k in ("hits", "misses", "bytes_read", "reads", "read_seconds",
                                                  "stall_seconds", "prefetch_issued", "prefetch_used")}
        acc = d["hits"] + d["misses"]
        f.update(slots=st1["slots"], slot_bytes=st1["slot_bytes"], policy=st1["policy"], direct=st1["direct"],
                 store_bytes_per_tok=d["bytes_read"] / n, store_bw=d["bytes_read"] / dt,
                 hit_rate=d["hits"] / acc if acc else float("nan"),
                 # hits that the cache kept (not brought in by a prefetch of this access)
                 hit_rate_retained=(d["hits"] - d["prefetch_used"]) / acc if acc else float("nan"),
                 stall_s_per_tok=d["stall_seconds"] / n, stall_share=d["stall_seconds"] / dt,
                 read_s_per_tok=d["read_seconds"] / n,
                 prefetch_precision=d["prefetch_used"] / d["prefetch_issued"] if d["prefetch_issued"] else float("nan"),
                 prefetch_recall=d["prefetch_used"] / (d["prefetch_used"] + d["misses"])
                 if d["prefetch_used"] + d["misses"] else float("nan"),
                 peak_slots_used=st1["peak_slots_used"],
                 # loads never used: prefetches the forward pass did not ask for (loads = misses + prefetches)
                 pf_waste_share=(d["prefetch_issued"] - d["prefetch_used"]) / (d["misses"] + d["prefetch_issued"])
                 if d["misses"] + d["prefetch_issued"] else float("nan"))
        f["store_bw_of_disk"] = f["store_bw"] / disk_bw
        lh = np.array(st1["layer_hits"]) - np.array(st0.get("layer_hits", [0] * len(st1["layer_hits"])))
        lm = np.array(st1["layer_misses"]) - np.array(st0.get("layer_misses", [0] * len(st1["layer_misses"])))
        f["layer_hit_rates"] = [float(h / (h + m)) if h + m else float("nan") for h, m in zip(lh, lm)]
        trace, start = r["trace"], r["trace_prefill"]
        decode_keys = np.array(trace[start:])
        counts = np.bincount(decode_keys, minlength=len(lh) * shape.n_expert).reshape(len(lh), -1)
        top = np.sort(counts, axis=1)[:, ::-1]
        # how concentrated the routing is: experts used during decode, and the share of accesses that
        # go to each layer's n_expert_used most used experts
        f["distinct_experts"] = int((counts > 0).sum())
        f["top_k_share"] = float(top[:, :shape.n_expert_used].sum() / max(1, counts.sum()))
        f["replay"] = {name: expert_replay.hit_rate(fn(trace, st1["slots"]), start)
                       for name, fn in expert_replay.REPLAYS.items()}
    return f


def summarize(runs: list[dict], disk_bw: float, shape: Shape) -> dict:
    """Median figures over runs; the detailed ones from the median run."""
    figs = [figures(r, disk_bw, shape) for r in runs]
    good = [f for f in figs if f["ok"]]
    out = {"runs": len(runs), "completed": len(good), "oom_kills": sum(bool(r["oom_killed"]) for r in runs),
           "peak_max": max(r["peak"] for r in runs), "limit": runs[0]["limit"]}
    if not good:
        out["error"] = next((r.get("stderr", "") for r in runs if r.get("stderr")), "no decode step")
        return out
    ranked = sorted(good, key=lambda f: f["tok_s"])
    out.update(ranked[len(ranked) // 2])
    for key in ("tok_s", "io_bytes_per_tok", "io_bw", "io_bw_of_disk", "store_bytes_per_tok", "store_bw",
                "store_bw_of_disk", "hit_rate"):
        if key in good[0]:
            out[key] = statistics.median(f[key] for f in good)
    out["tok_s_all"] = [f["tok_s"] for f in good]
    return out


# --- the report ------------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def print_report(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=220)
    disk = rep["disk"]
    con.print(f"model {rep['model']['path']} ({rep['model']['bytes'] / 2**30:.2f} GiB, expert slice "
              f"{disk['4']['slice_bytes'] / 2**10:.0f} KiB); CPU {rep.get('cpu', '?')}; threads {rep['threads']}; "
              f"decode {rep['decode']}; "
              f"load average at start {rep['loadavg_start']}, end {rep.get('loadavg_end')}")
    con.print(f"disk, random O_DIRECT reads of expert slices: 1 thread {disk['1']['bandwidth'] / 2**20:,.0f} MiB/s, "
              f"4 threads {disk['4']['bandwidth'] / 2**20:,.0f} MiB/s")
    t = Table(title="decode under hard memory limits (cgroup), median of runs")
    for col in ("limit", "engine", "tok/s", "x llama", "MiB read/tok", "read MiB/s", "% disk", "cgroup peak MiB",
                "RSS peak", "OOM", "hit", "hit w/o pf", "Belady", "LRU", "LFU", "pf prec", "pf recall", "pf waste", "stall %"):
        t.add_column(col, justify="right")
    for row in rep["rows"]:
        s = row["summary"]
        if not s.get("ok"):
            t.add_row(row["label"], row["engine"], "failed", "", "", "", "", _mb(s["peak_max"]), "",
                      str(s["oom_kills"]), *[""] * 9)
            continue
        peers = [x["summary"]["tok_s"] for x in rep["rows"] if x["label"].split()[0] == row["label"].split()[0]
                 and x["engine"].startswith("llama.cpp") and x["summary"].get("ok")]
        ratio = f"{s['tok_s'] / max(peers):.1f}" if row["engine"] == "ours" and peers else ""
        streaming = "hit_rate" in s
        pct = lambda v: f"{100 * v:.0f}" if v == v else "-"  # noqa: E731 (NaN: not applicable)
        rd = s.get("store_bytes_per_tok", s["io_bytes_per_tok"])
        bw = s.get("store_bw", s["io_bw"])
        t.add_row(row["label"], row["engine"] + (f" {row['policy']}" if row.get("policy") else ""),
                  f"{s['tok_s']:.2f}", ratio, _mb(rd), _mb(bw), pct(bw / rep["disk_bw"]),
                  _mb(s["peak_max"]) + (f" / {_mb(s['limit'])}" if s["limit"] else ""), _mb(s["vm_hwm"]),
                  str(s["oom_kills"]),
                  pct(s["hit_rate"]) if streaming else "", pct(s["hit_rate_retained"]) if streaming else "",
                  pct(s["replay"]["belady"]) if streaming else "",
                  pct(s["replay"]["lru"]) if streaming else "", pct(s["replay"]["lfu"]) if streaming else "",
                  pct(s["prefetch_precision"]) if streaming else "", pct(s["prefetch_recall"]) if streaming else "",
                  pct(s["pf_waste_share"]) if streaming else "",
                  pct(s["stall_share"]) if streaming else "")
    con.print(t)
    lt = Table(title="ours: per-layer decode hit rate (%) of the median run")
    lt.add_column("run")
    n_layer = rep["model"]["shape"]["n_layer"]
    for i in range(n_layer):
        lt.add_column(str(i), justify="right")
    lt.add_column("experts used", justify="right")
    lt.add_column(f"top-{rep['model']['shape']['n_expert_used']} share %", justify="right")
    for row in rep["rows"]:
        s = row["summary"]
        if row["engine"] == "ours" and "layer_hit_rates" in s:
            lt.add_row(f"{row['label']} {s.get('policy', '')}", *[f"{100 * v:.0f}" for v in s["layer_hit_rates"]],
                       str(s["distinct_experts"]), f"{100 * s['top_k_share']:.0f}")
    con.print(lt)
    con.print("ours: MiB read/tok and read MiB/s are the store's own reads (/proc/self/io read_bytes, in the JSON as "
              "io_bytes_per_tok, agrees); llama.cpp's are /proc/self/io read_bytes. % disk: against the better "
              "of the 1- and 4-reader disk figures. hit: demand accesses found resident or already being read "
              "(prefetched included); hit w/o pf: those not brought in by a prefetch; the replays (Belady, LRU, LFU) "
              "are demand-only, same slot count, same trace: a ':demand' row (no prefetch) compares with them on "
              "equal terms. pf waste: share of the "
              "store's loads (misses + prefetches) that no demand used. 'none' rows: no limit, "
              "file in the page cache beforehand (charged to the parent's cgroup, hence the small cgroup peak); "
              "RSS peak counts the memory-mapped file pages too.")


# --- main ------------------------------------------------------------------------------------------

def check_model(path: Path, args: argparse.Namespace, n: int = 8, n_text: int = 24) -> dict:
    """llama.cpp loads the file; both engines agree on it.

    Greedy tokens after the prompt (random Qwen3-MoE weights: they repeat one token, so this alone
    shows little), then the logits at every position of prompt + `n_text` tokens of TEXT: argmax
    agreement and the largest difference against the logits' spread. Ours streaming from 16 slots
    must give the unconstrained run's logits exactly. The yardstick of rounding: llama.cpp with its
    repacked kernels against llama.cpp without them (mmap), the same figures.
    """
    from llama_cpp import Llama

    from edgeai.runtimes.base import Sampling
    from edgeai.runtimes.native import NativeBackend

    greedy, logits = {}, {}
    for label, repack in (("llama.cpp", True), ("llama.cpp mmap", False)):
        with _llama_repack(repack):
            llm = Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, n_threads=args.threads, logits_all=True,
                        verbose=False)
        prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
        text = prompt + llm.tokenize((" " + TEXT).encode(), add_bos=False, special=False)[:n_text]
        llm.eval(prompt)
        toks = []
        for _ in range(n):
            toks.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([toks[-1]])
        greedy[label] = toks
        llm.reset()
        llm.eval(text)
        logits[label] = np.array(llm.scores[: len(text)], dtype=np.float32)
        del llm
    for label, store in (("ours", None), ("ours streaming", {"slots": 16})):
        be = NativeBackend(path, n_ctx=N_CTX, threads=args.threads, expert_store=store)
        be.set_sampling(Sampling(temperature=0))
        toks = [be.step(prompt)]
        for _ in range(n - 1):
            toks.append(be.step([toks[-1]]))
        greedy[label] = toks
        be.truncate(0)
        logits[label] = be.eval_logits(text)
        be.close()
    ours, theirs, theirs_mmap = logits["ours"], logits["llama.cpp"], logits["llama.cpp mmap"]

    def same_prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return {"prompt": prompt, "greedy": greedy,
            "greedy_same_prefix_llama": same_prefix(greedy["ours"], greedy["llama.cpp"]),
            "greedy_same_prefix_llama_mmap_vs_llama": same_prefix(greedy["llama.cpp mmap"], greedy["llama.cpp"]),
            "text_positions": len(text),
            "argmax_agree_llama": int((ours.argmax(1) == theirs.argmax(1)).sum()),
            "max_abs_logit_diff_llama": float(np.abs(ours - theirs).max()),
            "argmax_agree_llama_mmap_vs_llama": int((theirs_mmap.argmax(1) == theirs.argmax(1)).sum()),
            "max_abs_logit_diff_llama_mmap_vs_llama": float(np.abs(theirs_mmap - theirs).max()),
            "logit_std": float(theirs.std()),
            "streaming_identical": bool(np.array_equal(ours, logits["ours streaming"])
                                        and greedy["ours"] == greedy["ours streaming"])}


def alignment_ab(args: argparse.Namespace) -> None:
    """Ours at 50 % on both files, runs interleaved (the machine's load drifts between rows)."""
    args.work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    tok_s: dict[int, list[float]] = {4096: [], 32: []}
    for i in range(args.runs):
        for alignment in tok_s:
            path = make_model(model_path(args.work, alignment, shape), alignment, shape=shape)
            r = run_child("ours", path, path.stat().st_size // 2, args, tokens=args.tokens, cap=args.cap)
            f = figures(r, float("nan"), shape)
            tok_s[alignment].append(f["tok_s"])
            print(f"alignment {alignment} run {i}: {f['tok_s']:.2f} tok/s, {f['store_bytes_per_tok'] / 2**20:.1f} MiB "
                  f"read/tok, stall {1000 * f['stall_s_per_tok']:.1f} ms/tok", flush=True)
    for alignment, values in tok_s.items():
        print(f"alignment {alignment}: median {statistics.median(values):.2f} tok/s ({', '.join(f'{v:.2f}' for v in values)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="qwen3moe",
                    help="the benchmark model: Qwen3-MoE (Q4_0) or gpt-oss (MXFP4 experts), both about 2 GB")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps of ours")
    ap.add_argument("--llama-tokens", type=int, default=12, help="decode steps of llama.cpp under a limit")
    ap.add_argument("--llama-cap", type=float, default=45.0, help="seconds of decoding after which llama.cpp stops")
    ap.add_argument("--cap", type=float, default=120.0)
    ap.add_argument("--decode", choices=("text", "greedy"), default="text")
    ap.add_argument("--limits", default=",".join(str(x) for x in LIMITS))
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-policies", action="store_true")
    ap.add_argument("--policies", help="replacement policies compared at POLICY_LIMITS (default: Shape.policies, "
                    "all of them)")
    ap.add_argument("--skip-unaligned", action="store_true")
    ap.add_argument("--alignment-ab", action="store_true",
                    help="only: ours at 50%% on the 4096- and the 32-byte-aligned file, runs interleaved")
    ap.add_argument("--skip-check", action="store_true", help="skip the llama.cpp/ours agreement check")
    ap.add_argument("--show", action="store_true", help="print the last report again")
    # child mode (internal)
    ap.add_argument("--child", choices=("ours", "llama", "llama-mmap"))
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--policy", default="")
    args = ap.parse_args()

    if args.alignment_ab:
        alignment_ab(args)
        return
    if args.child:
        result = (child_ours if args.child == "ours" else child_llama)(args)
        Path(args.out).write_text(json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    policies = args.policies.split(",") if args.policies else shape.policies()
    report_path = args.work / ("report.json" if shape.name == "qwen3moe" else f"report-{shape.name}.json")
    if args.show:
        print_report(json.loads(report_path.read_text()))
        return

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    from bench_common import cpu_model

    rep: dict = {"threads": args.threads, "decode": args.decode, "cpu": cpu_model(), "loadavg_start": os.getloadavg(),
                 "rows": []}
    aligned = make_model(model_path(args.work, 4096, shape), 4096, shape=shape)
    size = aligned.stat().st_size
    rep["model"] = {"path": str(aligned), "bytes": size, "shape": asdict(shape)}
    log(f"model {aligned} ({size / 2**30:.2f} GiB)")
    if not args.skip_check:
        rep["check"] = check_model(aligned, args)
        log(f"agreement check: {rep['check']}")
    unaligned = None if args.skip_unaligned else make_model(model_path(args.work, 32, shape), 32, shape=shape)

    # median of 3 passes (each reads every slice at most once, in a new random order)
    rep["disk"] = {str(n): sorted((disk_bandwidth(aligned, n, seed=i) for i in range(3)),
                                  key=lambda d: d["bandwidth"])[1] for n in (1, 4)}
    rep["disk_bw"] = max(d["bandwidth"] for d in rep["disk"].values())  # the better of 1 and 4 readers
    log(f"disk: {json.dumps(rep['disk'])}")

    def save() -> None:
        rep["loadavg_end"] = os.getloadavg()
        report_path.write_text(json.dumps(rep, indent=1))

    def measure(label: str, engine: str, model: Path, limit: int | None, policy: str = "", warm: bool = False) -> None:
        llama = engine != "ours"
        tokens = args.llama_tokens if llama and limit else args.tokens
        cap = args.llama_cap if llama else args.cap
        runs = []
        for i in range(args.runs):
            if warm:  # unconstrained reference: the whole file in the page cache
                subprocess.run(["cat", str(model)], stdout=subprocess.DEVNULL, check=True)
            r = run_child(engine, model, limit, args, policy=policy, tokens=tokens, cap=cap, drop=not warm)
            f = figures(r, rep["disk_bw"], shape) if r.get("steps") else {"ok": False}
            log(f"{label} {engine} {policy} run {i}: " + (f"{f['tok_s']:.2f} tok/s, peak {_mb(r['peak'])} MiB, "
                f"read {_mb(f['io_bytes_per_tok'])} MiB/tok" + (f", hit {f['hit_rate']:.2f} belady "
                f"{f['replay']['belady']:.2f}" if 'hit_rate' in f else "") if f["ok"] else
                f"FAILED rc={r['returncode']} oom={r['oom_killed']} {r.get('stderr', '')[-300:]}"))
            runs.append(r)
            if r["oom_killed"]:  # the same limit kills it again: one run shows it
                break
        summary = summarize(runs, rep["disk_bw"], shape)
        for r in runs:  # traces are big: kept only while summarising
            r.pop("trace", None)
        rep["rows"].append({"label": label, "engine": ENGINES[engine], "policy": policy or summary.get("policy", ""),
                            "model": str(model), "summary": summary, "runs": runs})
        save()

    llamas = () if args.skip_llama else ("llama", "llama-mmap")
    for engine in ("ours", *llamas):
        measure("none", engine, aligned, None, warm=True)
    for frac in (float(x) for x in args.limits.split(",")):
        label = f"{round(frac * 100)}%"
        limit = int(size * frac)
        for engine in ("ours", *llamas):
            measure(label, engine, aligned, limit)
        if frac in POLICY_LIMITS and not args.skip_policies:
            default = next(r["policy"] for r in rep["rows"] if r["label"] == label and r["engine"] == "ours")
            for policy in policies:
                if policy != default:  # the default ran above
                    measure(label, "ours", aligned, limit, policy=policy)
        if frac == 0.5 and unaligned is not None:
            measure(label + " 32-byte-aligned file", "ours", unaligned, int(unaligned.stat().st_size * frac))
    save()
    print_report(rep)
    log(f"report: {report_path}")


if __name__ == "__main__":
    main()
