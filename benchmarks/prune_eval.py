"""Pruning quality: PPL / KLD / size of pruned files against the unpruned model, scored by `edgeai eval`.

Dense: SmolLM2-135M (the float32 Hugging Face folder that quant_vs_llamacpp.py uses), every file F16:
magnitude vs Wanda at 30 % and 50 % unstructured sparsity, 2:4 (magnitude and Wanda), and 2 and
4 of its 30 blocks dropped by block influence.

MoE: no small trained MoE checkpoint is at hand offline, so one is made for the benchmark from the
same SmolLM2 ("MoEfication", Zhang et al. 2022), Mixtral layout (llama.cpp runs it as `llama` with
experts): each block's FFN of 1536 neurons is split into 8 experts of 192 neurons by balanced k-means
on the neurons' gate rows, and 6 of the 8 run per token. The router of a block is fitted, by ridge
regression on the FFN inputs the dense model produces on a fitting text (the standard-library
docstrings after the calibration text), to predict each expert's share of the token's expert output
norms (inputs and targets scaled per token, so that every token counts alike), then scaled so that
a token's router logits spread by only ROUTER_SPREAD: the routing weights stay within ~5 % of 1/6, and
each expert's down projection is multiplied by 6, so a token's FFN output is about the sum of its 6
chosen experts' neurons. With all 8 experts chosen this is exactly the dense model (checked in
transformers: PPL 16.90 on the first 512 evaluation tokens, the dense model's); with 6 of 8 this
model scores 61 there in transformers (uniform weights over the same choice: 51; the gate-row-mean
router: 188; an oracle choosing the 6 largest expert outputs: 34).

An earlier construction (top-4 of 8, router = the mean gate row, down x 4) scored a perplexity of
~2e6 in llama.cpp and 4.3e6 in transformers on the same folder: not a converter fault, the model
itself was broken. Its unscaled router gave peaked softmax weights, so one expert's output was
multiplied by ~4 in every block; and 4 of 8 experts cannot stand in for SmolLM2's FFN even with
uniform weights (1.9e4) or an oracle router (775).

Expert pruning at 25 % and 50 % (by calibration routing weight, and by output lost) is compared with
dropping the same number of experts per block at random (seeded), which the benchmark writes as a
Hugging Face folder itself. At 25 % six experts remain, all of them used: each token's FFN output
is about the sum of the kept experts. At 50 % four remain and `expert_used_count` falls to 4, so
Mixtral's renormalized weights become 1/4 and the kept experts' outputs are scaled by 6/4: a property
of this construction (a trained MoE's experts are weighted, not summed), which all three choices share.

Each file's reference is its own unpruned model converted to F32 once. Texts (as quant_vs_llamacpp.py
makes them, offline): calibration = standard-library docstrings, cut to --calib-tokens; evaluation =
the license texts in site-packages. PPL and KLD are deterministic (no repeated runs); conversion time
is one run's wall time, on a shared machine.

    .venv/bin/python benchmarks/prune_eval.py --chunks 8

Files and report.json go to ~/.cache/edgeai-bench/prune-eval (--work).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quant_vs_llamacpp import site_packages_licenses, stdlib_docstrings, write_text  # noqa: E402

DENSE_STEPS = ["magnitude:0.3", "wanda:0.3", "magnitude:0.5", "wanda:0.5", "2:4", "wanda:2:4", "layers:2", "layers:4"]
MOE_STEPS = ["experts:0.25", "experts:0.5", "experts:0.25:loss", "experts:0.5:loss"]
N_EXPERT, TOP_K = 8, 6
ROUTER_SPREAD = 0.05  # std of a token's router logits: routing weights stay within ~5 % of 1 / TOP_K
MIB = 2**20


def edgeai_cli() -> Path:
    cli = Path(sys.executable).parent / "edgeai"
    if not cli.is_file():
        sys.exit(f"{cli} is missing; run `make install` first")
    return cli


def run(argv: list[str], log: Path) -> float:
    print("$", " ".join(map(str, argv)), flush=True)
    started = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(list(map(str, argv)), stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}); see {log}")
    return time.perf_counter() - started


# --- the MoE made for the benchmark ----------------------------------------------------------------

def balanced_kmeans(x: np.ndarray, k: int, iters: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster rows of x [n, d] into k clusters of exactly n/k rows: k-means centroids, then rows
    assigned greedily by similarity under the size cap. Returns [n] cluster ids."""
    n = x.shape[0]
    cap = n // k
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    centroids = unit[rng.choice(n, k, replace=False)]
    for _ in range(iters):
        sim = unit @ centroids.T  # [n, k]
        order = np.argsort(-sim, axis=None)  # (row, cluster) pairs, most similar first
        assign = np.full(n, -1)
        sizes = np.zeros(k, int)
        for flat in order:
            row, c = divmod(int(flat), k)
            if assign[row] < 0 and sizes[c] < cap:
                assign[row] = c
                sizes[c] += 1
        centroids = np.stack([unit[assign == c].mean(0) for c in range(k)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return assign


def router_inputs(dense: Path, text: str, n_ctx: int) -> dict[int, np.ndarray]:
    """Per block, the FFN's input rows [n_tokens, n_embd] (RMS-normed hidden states, what a router
    sees) of the dense model on `text`, from edgeai's numpy forward pass."""
    from edgeai.converters.plan import open_plan
    from edgeai.quant.calibrate import collect_statistics
    from edgeai.quant.forward import RowRecorder

    plan = open_plan(dense, "f32")
    try:
        names = [f"blk.{i}.ffn_gate.weight" for i in range(plan.hparams.n_layer)]
        recorder = RowRecorder(names)
        collect_statistics(plan, text, n_ctx=n_ctx, observers=[recorder])
    finally:
        plan.close()
    return {i: recorder.rows(name) for i, name in enumerate(names)}


def expert_output_norms(h: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                        groups: list[np.ndarray]) -> np.ndarray:
    """||down_e(silu(gate_e h) * up_e h)|| per token and expert: [n_tokens, n_expert]."""
    out = np.empty((h.shape[0], len(groups)), np.float32)
    for e, rows in enumerate(groups):
        a = h @ gate[rows].T
        out[:, e] = np.linalg.norm((a / (1 + np.exp(-a)) * (h @ up[rows].T)) @ down[:, rows].T, axis=1)
    return out


def make_moe(dense: Path, dest: Path, fit_text: str, n_ctx: int) -> Path:
    """SmolLM2 as a Mixtral-layout MoE (see the module docstring); the routers are fitted on `fit_text`."""
    from safetensors.numpy import load_file

    if (dest / "model.safetensors").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((dense / "config.json").read_text())
    n_ff = config["intermediate_size"]
    tensors = load_file(dense / "model.safetensors")
    inputs = router_inputs(dense, fit_text, n_ctx)
    out = {name: value for name, value in tensors.items() if ".mlp." not in name}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        gate, up, down = (tensors[f"{p}mlp.{r}_proj.weight"] for r in ("gate", "up", "down"))
        assign = balanced_kmeans(gate.astype(np.float64), N_EXPERT, seed=layer)
        groups = [np.nonzero(assign == e)[0] for e in range(N_EXPERT)]
        for e, rows in enumerate(groups):
            q = f"{p}block_sparse_moe.experts.{e}."
            out[q + "w1.weight"] = np.ascontiguousarray(gate[rows])
            out[q + "w3.weight"] = np.ascontiguousarray(up[rows])
            # the routing weights are ~1/TOP_K each: TOP_K x down makes the sum of the chosen experts
            out[q + "w2.weight"] = np.ascontiguousarray(down[:, rows] * TOP_K)
        # router [n_expert, n_embd]: ridge regression of each expert's share of a token's expert
        # output norms on the router input. Both are scaled per token (a ranking does not change
        # with the input's scale), so that every token counts alike: unscaled, the few tokens with
        # huge hidden states (each chunk's first) decide the fit, and the model scored PPL ~1000.
        h = inputs[layer].astype(np.float64)
        norms = expert_output_norms(inputs[layer], gate, up, down, groups).astype(np.float64)
        unit = h / np.linalg.norm(h, axis=1, keepdims=True)
        share = norms / norms.sum(axis=1, keepdims=True)
        ridge = 1e-3 * np.eye(h.shape[1])  # unit rows: mean ||x||^2 = 1
        router = np.linalg.solve(unit.T @ unit + ridge, unit.T @ share).T
        # the router sees h itself, whose norm varies from token to token: scale so that 99 % of
        # the fitting tokens' logits spread by at most ROUTER_SPREAD
        spread = np.percentile(np.std(h @ router.T, axis=1), 99)
        # C order: `router` is a transpose, and safetensors' numpy save_file writes a Fortran-ordered
        # array's buffer as it lies, under the C-order shape (a scrambled router)
        out[f"{p}block_sparse_moe.gate.weight"] = np.ascontiguousarray(router * (ROUTER_SPREAD / spread), np.float32)
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=N_EXPERT,
                  num_experts_per_tok=TOP_K, intermediate_size=n_ff // N_EXPERT, sliding_window=None)
    return _save_checkpoint(dest, config, out, tokenizer_from=dense)


def _save_checkpoint(dest: Path, config: dict, tensors: dict, tokenizer_from: Path) -> Path:
    """Write a Hugging Face folder: config.json, one safetensors file, the tokenizer files of `tokenizer_from`."""
    from safetensors.numpy import save_file

    (dest / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    for f in tokenizer_from.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, dest / f.name)
    return dest


def drop_random_experts(moe: Path, dest: Path, fraction: float, seed: int = 0) -> Path:
    """`moe` with round(fraction * N_EXPERT) random experts removed from every block (the baseline)."""
    from safetensors.numpy import load_file

    if (dest / "model.safetensors").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((moe / "config.json").read_text())
    tensors = load_file(moe / "model.safetensors")
    n_keep = N_EXPERT - int(round(fraction * N_EXPERT))
    rng = np.random.default_rng(seed)
    out = {n: v for n, v in tensors.items() if "block_sparse_moe" not in n}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}.block_sparse_moe."
        keep = np.sort(rng.choice(N_EXPERT, n_keep, replace=False))
        out[p + "gate.weight"] = np.ascontiguousarray(tensors[p + "gate.weight"][keep])
        for new, old in enumerate(keep):
            for w in ("w1", "w2", "w3"):
                out[f"{p}experts.{new}.{w}.weight"] = tensors[f"{p}experts.{old}.{w}.weight"]
    config.update(num_local_experts=n_keep, num_experts_per_tok=min(TOP_K, n_keep))
    return _save_checkpoint(dest, config, out, tokenizer_from=moe)


# --- rows -------------------------------------------------------------------------------------------

def evaluate(cli: Path, artifact: Path, ref: Path, text: Path, args, work: Path) -> dict:
    argv = [cli, "eval", artifact, "--reference", ref, "--text", text, "--ctx", args.ctx, "--chunks", args.chunks,
            "--threads", args.threads, "--json"]
    print("$", " ".join(map(str, argv)), flush=True)
    done = subprocess.run(list(map(str, argv)), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"eval failed: {done.stderr}")
    return json.loads(done.stdout)


def model_rows(cli: Path, model: Path, label: str, steps: list[str], calib: Path, text: Path, args, work: Path,
               extra: list[tuple[str, Path]] = ()) -> list[dict]:
    ref = work / f"{label}-ref-f32.gguf"
    if not ref.is_file():
        run([cli, "convert", model, "-o", ref, "--outtype", "f32", "--quiet"], work / f"{label}-ref.log")
    rows = []
    configs = [("none", model, None)] + [(s, model, s) for s in steps] + [(name, folder, None) for name, folder in extra]
    for name, source, step in configs:
        out = work / f"{label}-{name.replace(':', '_')}.gguf"
        argv = [cli, "convert", source, "-o", out, "--outtype", "f16", "--force", "--quiet", "--threads", args.threads]
        if step is not None:
            argv += ["--prune", step]
            if not step.startswith("magnitude") and step != "2:4":
                argv += ["--calib", calib, "--calib-ctx", args.calib_ctx]
        seconds = run(argv, work / f"{label}-{name.replace(':', '_')}.log")
        r = evaluate(cli, out, ref, text, args, work)
        rows.append({"model": label, "prune": name, "seconds": round(seconds, 1), **r})
        with open(work / "rows.jsonl", "a") as fh:  # kept as they come: a long run stopped early keeps its rows
            fh.write(json.dumps(rows[-1]) + "\n")
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'model':8} {'prune':22} {'MiB':>7} {'PPL':>9} {'KLD mean':>9} {'KLD p99':>8} {'top-1':>6} {'conv s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:8} {r['prune']:22} {r['size_bytes'] / MIB:7.1f} {r['ppl']:9.3f} {r['kld_mean']:9.4f} "
              f"{r['kld_p99']:8.3f} {100 * r['top1']:5.1f}% {r['seconds']:7.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path.home() / ".cache/edgeai-bench/smollm2-hf-f32")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/edgeai-bench/prune-eval")
    parser.add_argument("--calib", type=Path, help="calibration text (default: standard-library docstrings)")
    parser.add_argument("--text", type=Path, help="evaluation text (default: site-packages license texts)")
    parser.add_argument("--calib-chars", type=int, default=12_000, help="calibration text cut to this many characters")
    parser.add_argument("--calib-ctx", type=int, default=512)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8, help="evaluation chunks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-moe", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--steps", help="comma-separated --prune steps to run (default: all of DENSE_STEPS, MOE_STEPS)")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        sys.exit(f"{args.checkpoint} is not a checkpoint folder; make it with tests/helpers.py smollm2_hf_checkpoint "
                 "(or run benchmarks/convert_vs_llamacpp.py once)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cli = edgeai_cli()
    calib = write_text(work / "calib.txt", args.calib, lambda: stdlib_docstrings()[: args.calib_chars])
    text = write_text(work / "eval.txt", args.text, site_packages_licenses)
    wanted = set(args.steps.split(",")) if args.steps else set(DENSE_STEPS + MOE_STEPS)
    rows = []
    if not args.skip_dense:
        steps = [s for s in DENSE_STEPS if s in wanted]
        rows += model_rows(cli, args.checkpoint, "smollm2", steps, calib, text, args, work)
    if not args.skip_moe:
        # the routers are fitted on the docstrings after the calibration text's (not on the text they are judged on)
        fit_text = stdlib_docstrings()[args.calib_chars: 2 * args.calib_chars]
        moe = make_moe(args.checkpoint, work / f"smollm2-moe{N_EXPERT}x{TOP_K}", fit_text, args.calib_ctx)
        fractions = sorted({float(s.split(":")[1]) for s in MOE_STEPS if s in wanted})
        extra = [(f"random:{f:g}", drop_random_experts(moe, work / f"{moe.name}-random-{f:g}", f)) for f in fractions]
        rows += model_rows(cli, moe, f"moe{N_EXPERT}x{TOP_K}", [s for s in MOE_STEPS if s in wanted], calib, text, args, work, extra)
    report = work / ("report.json" if not args.steps else "report-steps.json")
    report.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                                 indent=2))
    print()
    print(f"eval: {rows[0]['n_tokens']:,} scored tokens ({rows[0]['n_chunks']} chunks of {rows[0]['n_ctx']}) of {text}; "
          f"calibration: {calib}; every file F16, reference: the unpruned model in F32")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
