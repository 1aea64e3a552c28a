"""A draft model for speculative decoding made from the target's own checkpoint
(`edgeai convert SRC -o draft.gguf --draft-of TARGET.gguf`, `convert(..., draft_of=, draft_layers=)`).

    SRC's plan -> the vocabulary compared with TARGET's (before any weight is read)
      -> fewer blocks: `--prune layers:K` (the K blocks that change the hidden state least on the
         calibration text, `edgeai.quant.prune.prune_layers`) -> 4-bit weights (q4_0 unless --quant)

The draft is converted from the checkpoint the target was, so it has the target's tokenizer by
construction; the comparison with TARGET catches a draft made from another checkpoint. It loads
with `edgeai.load(TARGET, speculative="draft.gguf")`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from edgeai.errors import EdgeAIError, OptionError

if TYPE_CHECKING:
    from edgeai.converters.plan import ConversionPlan
    from edgeai.gguf_header import GGUFHeader
    from edgeai.quant.prune import PruneSpec

# A draft's weights unless --quant (or --outtype) says otherwise: the smallest type the native engine
# decodes fastest; a draft's errors cost only acceptance, never output (verification is exact).
DRAFT_QUANT = "q4_0"
# Blocks a draft keeps by default: three quarters, rounded up (SmolLM2-135M: 23 of 30). Without
# retraining, agreement with the target falls steeply below that while the cost per drafted token only
# falls linearly: on SmolLM2 (README, speculative decoding) 26 of 30 blocks agreed with the target on
# 20-59% of greedy drafts, 23 of 30 (layers skipped) on 28% of positions, 16-21 of 30 on 2-11%.
DRAFT_KEEP_FRACTION = 0.75


def default_draft_layers(n_layer: int) -> int:
    """Blocks a draft of an n_layer-block model keeps unless --draft-layers says (at least 1, fewer than n_layer)."""
    return min(n_layer - 1, max(1, math.ceil(n_layer * DRAFT_KEEP_FRACTION)))


def read_target(draft_of: str | Path) -> GGUFHeader:
    """TARGET's GGUF header; OptionError naming --draft-of when it is not a readable GGUF file."""
    from edgeai.gguf_header import read_header

    path = Path(draft_of)
    if not path.is_file():
        raise OptionError(f"--draft-of {path}: {'not a file' if path.exists() else 'no such file'}; give the target "
                          "model's GGUF (the file the draft will speculate for)")
    try:
        return read_header(path)
    except EdgeAIError as exc:
        raise OptionError(f"--draft-of {path} is not a GGUF file edgeai can read: {exc}") from exc


def draft_step(plan: ConversionPlan, target: GGUFHeader, draft_layers: int | None) -> PruneSpec:
    """The `layers:K` pruning step that leaves `draft_layers` blocks of `plan` (default:
    `default_draft_layers`), after checking that the plan's vocabulary is the target's. Records the
    draft in the plan's recipe. OptionError naming --draft-layers or --draft-of."""
    from edgeai.options import checked_int
    from edgeai.quant.prune import PruneKind, PruneSpec
    from edgeai.speculative import compare_vocabularies

    if plan.hparams is None or plan.spec is None:
        raise OptionError(f"--draft-of: architecture {plan.arch!r} has no spec in edgeai.converters, so edgeai cannot "
                          "choose the blocks to drop on calibration text")
    n_layer = plan.hparams.n_layer
    if n_layer < 2:
        raise OptionError(f"--draft-of: {plan.name} has {n_layer} block; a draft needs fewer blocks than its target")
    keep = default_draft_layers(n_layer) if draft_layers is None else checked_int(
        "draft_layers (--draft-layers)", draft_layers, minimum=1, maximum=n_layer - 1,
        why=f"blocks the draft keeps of the {n_layer} of {plan.name}; all of them would make the target again")
    source_tokens = next((kv.value for kv in plan.kv if kv.key == "tokenizer.ggml.tokens"), None)
    key = "tokenizer.ggml.tokens"
    target_tokens = target.native.string_array(target.metadata[key].key) if target.get(key) is not None else None
    if source_tokens is None or target_tokens is None:
        raise OptionError(f"--draft-of: {plan.name if source_tokens is None else target.path.name} has no vocabulary "
                          f"({key}) to compare; a draft needs its target's vocabulary")
    compare_vocabularies([t.encode() if isinstance(t, str) else bytes(t) for t in source_tokens], target_tokens,
                         draft=f"the draft converted from {plan.name}", target=f"--draft-of {target.path.name}")
    plan.extra_recipe["draft_of"] = {"target": target.path.name, "block_count": [n_layer, keep]}
    return PruneSpec(PruneKind.LAYERS, count=n_layer - keep)
