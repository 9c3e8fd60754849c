"""The synthetic world of the trained tiny (tools/shapes.py) and the pixel classifier its eval relies on.

The classifier must read rendered ground truth back perfectly, or the eval's accuracies would
measure the classifier rather than the model. numpy and Pillow only: no torch, well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest


def test_classifier_reads_every_eval_case_back(shapes):
    wrong = []
    for case in shapes.EVAL_CASES:
        got = shapes.classify(shapes.eval_truth(case))
        if (got["colour"], got["shape"], got["background"]) != case[:3]:
            wrong.append((case, got))
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_classifier_at_every_size_and_at_the_corners(shapes, shape):
    rng = np.random.default_rng(7)
    names = list(shapes.COLOURS)
    for side in range(shapes.MIN_SIDE, shapes.MAX_SIDE + 1):
        far = shapes.SIZE - shapes.MARGIN - side
        for x, y in ((shapes.MARGIN, shapes.MARGIN), (far, far), (shapes.MARGIN, far), (far, shapes.MARGIN)):
            colour, background = rng.choice(names, 2, replace=False)
            got = shapes.classify(shapes.render(colour, shape, background, rng, side=side, x=x, y=y))
            assert (got["colour"], got["shape"], got["background"]) == (colour, shape, background), (side, x, y, got)
            assert abs(got["fill"] - shapes.FILL[shape]) < 0.08


def test_classifier_survives_noise(shapes):
    """Generated pictures are not flat: mild per-pixel noise and a few stray specks must not change the answer."""
    rng = np.random.default_rng(3)
    for case in shapes.EVAL_CASES[:60]:
        pixels = np.asarray(shapes.eval_truth(case)).astype(np.float64)
        pixels += rng.normal(0, 20, pixels.shape)
        specks = rng.integers(0, shapes.SIZE, (3, 2))
        pixels[specks[:, 0], specks[:, 1]] = rng.integers(0, 256, (3, 3))
        got = shapes.classify(np.clip(pixels, 0, 255).astype(np.uint8))
        assert (got["colour"], got["shape"], got["background"]) == case[:3], (case, got)


def test_a_picture_without_a_shape_has_no_shape(shapes):
    got = shapes.classify(np.full((32, 32, 3), 255, np.uint8))
    assert got["background"] == "white" and got["shape"] is None and got["colour"] is None


def test_world_is_seeded_and_well_formed(shapes):
    a, caps_a = shapes.sample_arrays(16, np.random.default_rng(5))
    b, caps_b = shapes.sample_arrays(16, np.random.default_rng(5))
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caps_a == caps_b
    for cap in caps_a:
        words = cap.split()
        assert len(words) == 7 and words[0] == "a" and words[4] == "a" and words[-1] == "background"
        colour, shape, background = words[1], words[2], words[5]
        assert colour != background and shape in shapes.SHAPES and (colour, shape, background) in shapes.TRAIN_COMBOS


def test_held_out_split(shapes):
    assert len(shapes.COMBOS) == 90 and len(shapes.HOLDOUT) == 6
    assert not set(shapes.HOLDOUT) & set(shapes.TRAIN_COMBOS)
    # every word of the world is still seen in training
    for i, names in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.COLOURS)):
        assert {c[i] for c in shapes.TRAIN_COMBOS} == set(names)
    cases = shapes.EVAL_CASES
    assert len(cases) == len(set(cases)) == 90 * shapes.EVAL_SEEDS_PER_COMBO
    assert {c[:3] for c in cases} == set(shapes.COMBOS)
    assert {c[:3] for c in cases[:30]} & set(shapes.HOLDOUT)  # --limit 30 still sees some held-out combos
    assert all(c[3] >= shapes.EVAL_SEED_BASE for c in cases)
    with pytest.raises(ValueError):
        shapes.render("red", "circle", "red", np.random.default_rng(0))
