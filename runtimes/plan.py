"""The memory planner: a budget split before the native engine loads anything.

The budget is the whole process: what the process holds already (interpreter, libraries, the
tokenizer), the tensors kept in memory, the KV cache, the engine's compute buffers, and the expert
cache. Sizes come from the engine itself (`_native.memory_sizes`: the same arithmetic its
allocations use), the process from its resident set measured at planning time.

Four outcomes, the first that fits:
- everything fits: weights are read in place from the memory map (no streaming);
- an MoE whose experts do not fit: dense tensors are copied into memory and experts are streamed
  from the file into as many cache slots as the rest of the budget holds;
- dense weights do not fit either: each layer's matrices are streamed too, through two layer slots
  (the layer computed and the next one, read meanwhile). Every token then reads every layer from
  disk: decode runs at the disk's speed, not memory's;
- not even that fits: refused (BudgetError) before anything is loaded, with the smallest budget
  that would work and what would lower it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from edgeai.budget import format_bytes
from edgeai.errors import BudgetError, OptionError
from edgeai.gguf_header import GGUFHeader
from edgeai.runtimes.expert_store import ExpertStoreOptions, with_slots

log = logging.getLogger(__name__)

# Memory the engine takes besides weights, KV cache, compute buffers and expert slots: the reader
# and worker threads' stacks as far as they are touched, allocator slack, the copy of the logits
# handed to Python. An allowance, not a calibration: the cgroup test checks that the process's
# RSS stays within the plan (215 MB MoE), and the 2 GB benchmark peaked at 1000 of 1033 MiB at 50%.
ENGINE_OVERHEAD = 24 * 2**20
LAYER_SLOTS = 2  # dense streaming: the layer being computed and the next one
# KV caches a refusal offers in place of a larger one, largest first: q8_0 (34/64 of f16's bytes),
# q8_0 keys with q4_0 values (26/64: keys, which decide where attention goes, kept finer), q4_0 (18/64).
SMALLER_KV_CACHES = ("q8_0", "q8_0/q4_0", "q4_0")


@dataclass(frozen=True)
class SpeculativeMemory:
    """What speculative decoding adds to the target's plan (bytes; `edgeai.speculative.speculative_memory`).

    The KV positions a verification writes lie inside the target's n_ctx (drafts are made only where
    they fit), so its KV cache is as planned; a verification adds its logits, [batch, n_vocab] float32
    twice (the engine's per-batch buffer and the result handed to Python), for the longest batch. A
    draft model adds all it holds: its weights (memory-mapped, every one read per drafted token), its
    KV cache and its compute buffers."""

    drafter: str  # "lookup", "self" or "model"
    verify: int  # logits of the longest verification batch
    verify_tokens: int  # its positions
    draft_path: Path | None = None
    draft_weights: int = 0
    draft_kv: int = 0
    draft_scratch: int = 0  # compute buffers and the engine's allowance (its threads, its logits)
    draft_n_ctx: int = 0
    draft_kv_cache: str = "f16"

    @property
    def total(self) -> int:
        return self.verify + self.draft_weights + self.draft_kv + self.draft_scratch

    def rows(self) -> list[tuple[str, int, str]]:
        rows = [("verification", self.verify, f"logits of up to {self.verify_tokens} positions ({self.drafter})")]
        if self.draft_path is not None:
            rows.append(("draft model", self.draft_weights + self.draft_kv + self.draft_scratch,
                         f"{self.draft_path.name}: weights {format_bytes(self.draft_weights)} (memory-mapped), KV cache "
                         f"{format_bytes(self.draft_kv)} ({self.draft_kv_cache}, {self.draft_n_ctx} positions), compute "
                         f"buffers {format_bytes(self.draft_scratch)}"))
        return rows


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is split for one model file (bytes)."""

    path: Path
    budget: int | None
    n_ctx: int
    process: int  # resident before loading: interpreter, libraries, tokenizer
    dense: int  # tensors kept in memory (all but the stacked experts)
    experts: int  # all expert tensors in the file
    kv: int
    scratch: int
    slot_bytes: int  # one cached expert (0 for a dense model)
    slots: int  # expert cache slots; 0 = experts read in place from the memory map
    n_expert_used: int
    n_experts: int  # n_layer * n_expert: slots beyond this would hold nothing
    n_layer: int = 0
    layer_matrices: int = 0  # the part of `dense` that can be streamed layer by layer
    layer_slot: int = 0  # one layer's slot
    layer_slots: int = 0  # 0: dense weights resident; else streamed through this many slots
    kv_cache: str = "f16"  # the KV cache's element type ("q8_0/q4_0": keys q8_0, values q4_0)
    speculative: SpeculativeMemory | None = None  # a drafter's and the verifications' share
    n_seq: int = 1  # sequence slots (parallel=N): `kv` and `scratch` hold every one's share
    slot_bytes_per_seq: int = 0  # what one more sequence slot costs: its KV cache and its logits

    def with_seqs(self, n: int) -> MemoryPlan:
        """This plan with n sequence slots instead of n_seq."""
        per_kv = self.kv // self.n_seq
        extra = (self.slot_bytes_per_seq - per_kv) * (n - self.n_seq)  # logits
        return replace(self, n_seq=n, kv=per_kv * n, scratch=self.scratch + extra)

    @property
    def streaming(self) -> bool:
        return self.slots > 0 or self.layer_slots > 0

    @property
    def dense_memory(self) -> int:
        if self.layer_slots:
            return self.dense - self.layer_matrices + self.layer_slots * self.layer_slot
        return self.dense

    @property
    def fixed(self) -> int:
        """Everything but the experts."""
        return (self.process + self.dense_memory + self.kv + self.scratch + ENGINE_OVERHEAD
                + (self.speculative.total if self.speculative is not None else 0))

    @property
    def expert_memory(self) -> int:
        return self.slots * self.slot_bytes if self.streaming else self.experts

    @property
    def total(self) -> int:
        return self.fixed + self.expert_memory

    @property
    def min_slots(self) -> int:
        """One layer's routed experts at once (fewer works, but reads them one by one)."""
        return max(2, self.n_expert_used)

    @property
    def minimum(self) -> int:
        """The smallest budget this file runs in at this context (streaming layers if that is smaller)."""
        streamed = replace(self, layer_slots=LAYER_SLOTS) if self.layer_matrices else self
        return min(self.fixed, streamed.fixed) + (self.min_slots * self.slot_bytes if self.experts else 0)

    def stream_config(self, options: ExpertStoreOptions | None = None) -> ExpertStoreOptions | None:
        """The streaming store's options for this plan (`options` with this plan's slot counts where
        they give none); None when every weight stays in the memory map."""
        if not self.streaming:
            return None
        return with_slots(options or ExpertStoreOptions(), self.slots, self.layer_slots)

    def rows(self) -> list[tuple[str, int, str]]:
        """(part, bytes, how) for printing."""
        if self.layer_slots:
            weights = ("weights", self.dense_memory,
                       f"norms, embeddings, routers in memory; layer matrices streamed through {self.layer_slots} slots "
                       f"of {format_bytes(self.layer_slot)} (every token reads all {self.n_layer} layers from disk)")
        else:
            weights = ("weights", self.dense, "copied into memory" if self.streaming else "memory-mapped")
        rows = [("process", self.process, "interpreter, libraries, tokenizer (measured)"), weights]
        if self.slots:
            rows.append(("expert cache", self.expert_memory, f"{self.slots} of {self.n_experts} experts "
                         f"({format_bytes(self.slot_bytes)} each), streamed from the file"))
        elif self.experts:
            rows.append(("experts", self.expert_memory, "all in memory (memory-mapped)"))
        slots = f" in each of {self.n_seq} sequence slots" if self.n_seq > 1 else ""
        rows += [("KV cache", self.kv, f"{self.kv_cache}, {self.n_ctx} positions{slots}"),
                 ("compute buffers", self.scratch + ENGINE_OVERHEAD, "activations, logits, threads")]
        return rows + (self.speculative.rows() if self.speculative is not None else [])

    def to_json(self) -> dict:
        return {"path": str(self.path), "budget": self.budget, "n_ctx": self.n_ctx, "kv_cache": self.kv_cache,
                "parallel": self.n_seq,
                "streaming": self.streaming,
                "slots": self.slots, "slot_bytes": self.slot_bytes, "layer_slots": self.layer_slots,
                "layer_slot_bytes": self.layer_slot, "total": self.total, "minimum": self.minimum,
                "parts": {name: size for name, size, _ in self.rows()}}


def plan_memory(header: GGUFHeader, config: dict, *, budget: int | None, n_ctx: int, threads: int, kv_cache: str = "f16",
                process_bytes: int | None = None, speculative: SpeculativeMemory | None = None,
                n_seq: int = 1, observe: int = 0) -> MemoryPlan:
    """Split `budget` for the GGUF whose parsed header is `header` in the native engine (config:
    `runtimes.native.engine_config`).

    kv_cache: the KV cache's element type (`runtimes.base.kv_cache_type`: "f16", "q8_0", "q4_0" or
    keys/values such as "q8_0/q4_0"; a quantized type needs a head size that is a multiple of 32,
    else OptionError).
    process_bytes: what the process holds before the model (default: its resident set now).
    speculative: what speculative decoding adds (a draft model, the verification's logits): part of
    the fixed memory, so a budget too small for target and draft together is refused with the
    smallest that fits both.
    n_seq: sequence slots (`load(parallel=)`): each holds a KV cache of n_ctx positions and its
    logits; a budget too small for them all is refused with the number of slots that fits.
    observe: queries kept per slot and layer for compaction (`NativeBackend(observe=)`), counted
    with each slot.
    Raises BudgetError when the model cannot run within the budget.
    """
    from edgeai.native_bridge import kv_types, native

    from edgeai.runtimes.base import kv_cache_type, kv_cache_types

    path = header.path
    head_dim = int(config["head_dim"])
    kv_cache = kv_cache_type(kv_cache)
    for part in dict.fromkeys(kv_cache_types(kv_cache)):
        if part != "f16" and head_dim % 32:
            raise OptionError(f"a {part} KV cache needs a head size that is a multiple of 32; {Path(path).name}'s is "
                              f"{head_dim}: use kv_cache='f16'")
    if process_bytes is None:
        import psutil

        process_bytes = psutil.Process().memory_info().rss
    sizes = native.memory_sizes(header.native, config, n_ctx, threads, kv_types(kv_cache))
    n_experts = int(config["n_layer"]) * int(config["n_expert"])
    # a slot beyond the first: its KV cache, its logits, and its row of a batched step's logits
    # (and, with context_overflow="compact", the queries its compactions score by)
    observed = native.observe_bytes(config, observe) if observe else 0
    per_seq = sizes["kv"] + 2 * 4 * int(config["n_vocab"]) + observed
    plan = MemoryPlan(Path(path), budget, n_ctx, process_bytes, sizes["dense"], sizes["experts"], sizes["kv"],
                      sizes["scratch"] + observed, sizes["slot"], 0, int(config["n_expert_used"]), n_experts,
                      int(config["n_layer"]), sizes["layer_matrices"], sizes["layer_slot"], 0, kv_cache, speculative,
                      1, per_seq).with_seqs(n_seq)
    if budget is None:
        _check_allocatable(plan)
    if budget is None or plan.total <= budget:
        return plan
    candidates = [plan]
    if plan.layer_matrices:
        candidates.append(replace(plan, layer_slots=LAYER_SLOTS))
    for candidate in candidates:
        if not plan.experts and candidate.fixed <= budget:
            log.info("%s: dense layers streamed from disk through %d slots", Path(path).name, candidate.layer_slots)
            return candidate
        if plan.experts and budget - candidate.fixed >= candidate.min_slots * plan.slot_bytes:
            slots = min(n_experts, (budget - candidate.fixed) // plan.slot_bytes)
            log.info("%s: %d of %d experts cached in %s; the rest streamed from disk%s", Path(path).name, slots,
                     n_experts, format_bytes(slots * plan.slot_bytes),
                     ", dense layers too" if candidate.layer_slots else "")
            return replace(candidate, slots=int(slots))
    # what each smaller KV cache would save, when it is a lever left to pull
    # (in every sequence slot)
    one_kv = plan.kv // plan.n_seq
    savings = [(kind, plan.n_seq * (one_kv - native.kv_bytes(config, n_ctx, kv_types(kind)))) for kind in SMALLER_KV_CACHES] \
        if head_dim % 32 == 0 else []
    # what half the context would save (less than half the cache where sliding-window rings stay as they are)
    half_ctx_saving = plan.n_seq * (one_kv - native.kv_bytes(config, max(1, n_ctx // 2), kv_types(kv_cache)))
    raise BudgetError(_refusal(min(candidates, key=lambda c: c.fixed), budget, [(k, s) for k, s in savings if s > 0],
                               half_ctx_saving), plan.minimum)


def _check_allocatable(plan: MemoryPlan) -> None:
    """Without a budget, still refuse what this machine could never allocate: the KV cache and
    compute buffers (weights are mapped from the file and may page) beyond its physical memory,
    which an absurd n_ctx asks for. llama.cpp only warns above the trained context; here n_ctx is
    already at most that, so this is the remaining bound."""
    import psutil

    needed = plan.kv + plan.scratch + ENGINE_OVERHEAD
    memory = psutil.virtual_memory().total
    if needed > memory:
        raise BudgetError(f"n_ctx={plan.n_ctx} needs {format_bytes(needed)} ({needed:,} bytes) of KV cache and compute "
                          f"buffers for {plan.path.name}, more than this machine's {format_bytes(memory)} of memory; "
                          "give a smaller context (--ctx) or a quantized KV cache (--kv-cache q8_0, or q4_0: a quarter "
                          "of f16's memory)", needed)


def _refusal(plan: MemoryPlan, budget: int, kv_savings: list[tuple[str, int]], half_ctx_saving: int) -> str:
    parts = ", ".join(f"{name} {format_bytes(size)}" for name, size, _ in plan.rows() if name != "experts")
    if plan.experts:
        parts += f", {plan.min_slots} expert slots {format_bytes(plan.min_slots * plan.slot_bytes)}"
    levers = []
    if plan.n_seq > 1:  # the slots that fit, if any: the minimum falls by one slot's share per slot dropped
        fits = max((k for k in range(1, plan.n_seq) if plan.with_seqs(k).minimum <= budget), default=0)
        levers.append(f"{fits} sequence slot{'s' * (fits > 1)} (--parallel {fits}) fit{'s' * (fits == 1)} in it" if fits else
                      f"even one sequence slot saves only {format_bytes((plan.n_seq - 1) * plan.slot_bytes_per_seq)} "
                      f"(--parallel 1)")
    levers += [f"a context of {plan.n_ctx // 2} positions (--ctx) saves {format_bytes(half_ctx_saving)}"] \
        if plan.n_ctx >= 128 else []
    levers += [f"a {kind} KV cache (--kv-cache {kind}) saves {format_bytes(saving)}" for kind, saving in kv_savings]
    spec = plan.speculative
    if spec is not None and spec.draft_path is not None:
        levers.append(f"speculative='lookup' (no draft model) saves {format_bytes(spec.total - spec.verify)}")
    levers.append(f"a smaller quantization (edgeai convert --quant q4_k_m) shrinks the {format_bytes(plan.dense)} of "
                  "resident weights" + (" and the expert slots" if plan.experts else ""))
    slots = f" with {plan.n_seq} sequence slots" if plan.n_seq > 1 else ""
    return (f"{plan.path.name} needs at least {format_bytes(plan.minimum)} ({plan.minimum:,} bytes) at n_ctx={plan.n_ctx}{slots}, "
            f"more than the memory budget of {format_bytes(budget)} ({budget:,} bytes): {parts}. To run it: raise the "
            f"budget to {format_bytes(plan.minimum)}, or " + "; ".join(levers) + ".")
