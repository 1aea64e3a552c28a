"""`edgeai convert SRC -o draft.gguf --draft-of TARGET` (converters/draft.py): a pruned 4-bit draft
of the target's checkpoint that loads as its draft model, and refusals naming the option."""

import json

import pytest
from typer.testing import CliRunner

import edgeai
from edgeai.cli import app
from edgeai.errors import OptionError
from edgeai.gguf_header import read_header
from helpers import TINY_ARCHS, corpus, make_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, its F32 target GGUF, calibration text file): a 4-block SmolLM-style model."""
    root = tmp_path_factory.mktemp("draft")
    folder = make_tiny_checkpoint(root / "hf", next(a for a in TINY_ARCHS if a.name == "smollm"), num_hidden_layers=4)
    calib = root / "calib.txt"
    calib.write_text("\n".join(corpus()[:120]))
    return folder, edgeai.convert(folder, root / "target.gguf", outtype="f32"), calib


def _greedy(model, prompt, n):
    return [c.token for c in model.stream(prompt, max_tokens=n, temperature=0) if c.token is not None]


def test_cli_draft_loads_as_the_targets_draft_and_keeps_greedy_output(tiny, tmp_path):
    folder, target, calib = tiny
    draft = tmp_path / "draft.gguf"
    result = runner.invoke(app, ["convert", str(folder), "-o", str(draft), "--draft-of", str(target),
                                 "--calib", str(calib), "-q"])
    assert result.exit_code == 0, result.output
    header = read_header(draft)
    assert header.get("llama.block_count") == 3  # the default: three quarters of 4 blocks, rounded up
    recipe = json.loads(header.get("edgeai.recipe"))
    assert recipe["recipe"] == "q4_0" and recipe["draft_of"] == {"target": "target.gguf", "block_count": [4, 3]}
    assert len(recipe["pruning"]["layers"]["dropped"]) == 1
    assert header.tensors["blk.0.attn_q.weight"].type_name.lower() == "q4_0"

    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat"
    with edgeai.load(target, backend="native", threads=1) as m:
        want = _greedy(m, prompt, 32)
    with edgeai.load(target, backend="native", threads=1, speculative=str(draft), draft_tokens=4) as m:
        m._speculator.adaptive = False  # draft every step, however the timing goes
        assert _greedy(m, prompt, 32) == want
        assert m.stats().extra["speculative"]["verifications"] > 0


def test_draft_layers_sets_the_blocks_kept(tiny, tmp_path):
    folder, target, calib = tiny
    out = edgeai.convert(folder, tmp_path / "d.gguf", draft_of=target, draft_layers=1, calib=calib, quant="q4_k_m")
    header = read_header(out)
    assert header.get("llama.block_count") == 1
    assert json.loads(header.get("edgeai.recipe"))["recipe"] == "q4_k_m"  # --quant overrides the draft's q4_0


def test_bad_draft_options_are_refused_by_name(tiny, tmp_path):
    from edgeai.paths import default_model_path

    folder, target, calib = tiny
    out = tmp_path / "d.gguf"

    def convert(**kw):
        return edgeai.convert(folder, out, **{"draft_of": target, "calib": calib, **kw})

    for layers in (0, 4, 2.5, True):
        with pytest.raises(OptionError, match=r"draft_layers \(--draft-layers\)"):
            convert(draft_layers=layers)
    with pytest.raises(OptionError, match="--draft-layers .*--draft-of"):
        convert(draft_of=None, calib=None, draft_layers=2)
    with pytest.raises(OptionError, match="--draft-of .*no such file"):
        convert(draft_of=tmp_path / "missing.gguf")
    with pytest.raises(OptionError, match="--draft-of .*not a GGUF"):
        convert(draft_of=calib)
    with pytest.raises(OptionError, match="--draft-of .*--calib"):
        convert(calib=None)
    with pytest.raises(OptionError, match="--draft-layers N, not --prune layers"):
        convert(prune="layers:1")
    with pytest.raises(OptionError, match="--draft-of .*--format onnx"):
        convert(format="onnx")
    # a target of another checkpoint (SmolLM2's 49,152 tokens): refused before any weight is read
    with pytest.raises(OptionError, match=r"converted from .* --draft-of .*\.gguf.*vocabulary"):
        convert(draft_of=default_model_path())
    assert not out.exists()
    result = runner.invoke(app, ["convert", str(folder), "-o", str(out), "--draft-of", str(target), "--calib",
                                 str(calib), "--draft-layers", "9"])
    assert result.exit_code == 1 and "--draft-layers" in result.output
