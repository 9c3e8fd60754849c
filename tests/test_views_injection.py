"""The intervention is visible: default picks of sheet and compare include the injected steps, and those cells
(and the GIF's frames) carry a 'noise' badge, nowhere else; compare's columns say what differs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

import sdstream
from sdstream import GenerationRequest
from sdstream.errors import BadInput
from sdstream.record.rundir import Frame, RunRecord
from sdstream.views import animate, compare, draw, sheet

STEPS, INJECT = 8, 3
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """masked: noise injected (circle) at step 3 of 8; plain: the same seed without a mask; sparse: frames every
    2nd step (1, 3, 5, 7, 8) and the injection at step 4, which has no frame."""
    root = tmp_path_factory.mktemp("injection")
    masked, plain, sparse = root / "masked", root / "plain", root / "sparse"
    base = dict(model="tiny", prompt=PROMPT, steps=STEPS, seed=1)
    sdstream.run(GenerationRequest(**base, mask="circle", inject_at_step=(INJECT,)), masked)
    sdstream.run(GenerationRequest(**base), plain)
    sdstream.run(GenerationRequest(**base, mask="circle", inject_at_step=(4,), frames_every=2), sparse)
    return masked, plain, sparse


def _badge_pixels(image, box=None) -> int:
    a = np.asarray(image.convert("RGB").crop(box) if box else image.convert("RGB"), dtype=np.int32)
    return int((np.abs(a - np.asarray(draw.BADGE)).sum(axis=2) <= 12).sum())


def _record(steps: int, injected: list[int], every: int = 1) -> RunRecord:
    frames = [Frame(s, 1000 - s, Path(f"step-{s:04d}.png")) for s in range(1, steps + 1)
              if (s - 1) % every == 0 or s == steps]
    return RunRecord(Path("run"), {"injected_at": injected, "total_steps": steps}, frames)


# --------------------------------------------------------------------------- which steps


def test_the_default_pick_includes_the_injected_step():
    run = _record(25, [10])
    plain = [f.step for f in draw.pick_steps(_record(25, []))]
    assert 10 not in plain and {9, 11} <= set(plain)  # what a newcomer got: 9 and 11, not 10
    picked = [f.step for f in draw.pick_steps(run)]
    assert 10 in picked and 9 in picked and len(picked) == draw.SHEET_COUNT  # the count kept, the step before too
    assert picked[0] == 1 and picked[-1] == 25
    for count in (1, 2, 3, 5):
        steps = [f.step for f in draw.pick_steps(run, count=count)]
        assert 10 in steps and 25 in steps, (count, steps)
    two = _record(25, [4, 20])
    assert {4, 20} <= {f.step for f in draw.pick_steps(two, count=4)}


def test_a_skipped_injected_step_marks_the_next_frame():
    run = _record(8, [4], every=2)  # frames 1, 3, 5, 7, 8
    assert draw.injections(run) == {5: [4]}
    assert draw.badge_text(5, [4]) == "noise @4" and draw.badge_text(3, [3]) == "noise"
    assert 5 in [f.step for f in draw.pick_steps(run, count=2)]


# --------------------------------------------------------------------------- sheet


def test_sheet_badges_the_injected_cell_only(runs, tmp_path, cli):
    masked, plain, _ = runs
    code, stdout, stderr = cli("sheet", str(masked), "--count", "3", "--size", "96", "-o", str(tmp_path / "s.png"),
                               "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["steps"] == [1, INJECT, STEPS] and info["injected"] == [INJECT]  # the even pick was 1, 5, 8
    made = sheet.make_sheet(masked, count=3, size=96, out=tmp_path / "again.png")
    with Image.open(made.path) as im:
        counts = [_badge_pixels(im, box) for box in made.boxes]
        x0, y0, _, _ = made.boxes[1]
        corner = _badge_pixels(im, (x0, y0, x0 + 40, y0 + 20))  # the tag is in the picture's top-left corner
    assert counts[1] > 100 and corner > 100 and counts[0] == counts[2] == 0, counts

    quiet = sheet.make_sheet(plain, count=3, size=96, out=tmp_path / "plain.png")
    with Image.open(quiet.path) as im:
        assert quiet.steps == [1, 5, STEPS] and quiet.injected == [] and _badge_pixels(im) == 0


def test_sheet_of_a_run_whose_injected_step_has_no_frame(runs, tmp_path):
    _, _, sparse = runs
    made = sheet.make_sheet(sparse, count=2, size=96, out=tmp_path / "s.png")
    assert made.steps == [1, 5, STEPS] and made.injected == [5]


# --------------------------------------------------------------------------- animate


def test_gif_badges_and_pauses_on_the_injected_frame(runs, tmp_path, cli):
    masked, _, sparse = runs
    out = tmp_path / "a.gif"
    code, stdout, stderr = cli("animate", str(masked), "--size", "96", "-o", str(out), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["injected"] == [INJECT]
    with Image.open(out) as im:
        frames = [(f.convert("RGB"), f.info["duration"]) for f in ImageSequence.Iterator(im)]
    assert len(frames) == STEPS
    badged = [i + 1 for i, (f, _) in enumerate(frames) if _badge_pixels(f, (0, 0, 40, 20)) > 50]
    assert badged == [INJECT]
    durations = [d for _, d in frames]
    assert durations[INJECT - 1] == 100 + 1000 * draw.INJECT_HOLD and durations[0] == 100

    plain = animate.make_animation(masked, None, out=tmp_path / "n.gif", badge=False, size=96)
    assert plain.injected == [] and plain.durations_ms[INJECT - 1] == 100
    # --every keeps the frame that shows the injection
    assert animate.make_animation(sparse, None, out=tmp_path / "e.gif", every=3).steps == [1, 5, 7, 8]


def test_caption_labels_every_frame(runs, tmp_path):
    masked, _, _ = runs
    anim = animate.make_animation(masked, None, out=tmp_path / "c.gif", caption=True, size=128)
    w, h = anim.size
    assert w == 128 and h > 128 + 10  # a caption strip under the picture
    with Image.open(anim.path) as im:
        frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
    strips = [np.asarray(f.crop((0, 128, w, h)), dtype=np.int32) for f in frames]
    assert all((s.max(axis=2) > 150).sum() > 30 for s in strips)  # text on every frame
    assert not np.array_equal(strips[0], strips[1])  # and it changes with the step
    assert _badge_pixels(frames[INJECT - 1].crop((0, 128, w, h))) > 0  # the injected step's caption is coloured


# --------------------------------------------------------------------------- compare


def test_compare_columns_say_what_differs_and_the_injected_row_is_shown(runs, tmp_path, cli):
    masked, plain, _ = runs
    out = tmp_path / "cmp"
    code, stdout, stderr = cli("compare", str(masked), str(plain), "--count", "3", "--size", "64", "-o", str(out),
                               "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["labels"] == [f"mask circle · inject {INJECT}", "no mask"]
    assert result["differs"] == ["--mask", "--inject-at-step"]
    sheet_steps = [result["steps"][r - 1]["steps"][0] for r in result["sheet_rows"]]
    assert sheet_steps == [1, INJECT, STEPS]
    assert [s["injected"] for s in result["steps"]][INJECT - 1] == [True, False]
    with Image.open(out / "sheet.png") as im:
        assert _badge_pixels(im) > 20
    with Image.open(out / "compare.gif") as im:
        durations = [f.info["duration"] for f in ImageSequence.Iterator(im)]
    assert durations[INJECT - 1] > durations[0]


def test_compare_sheet_has_a_colour_scale_and_columns(runs, tmp_path):
    masked, plain, _ = runs
    one = compare.make_compare([masked, plain], tmp_path / "one", size=48, count=4)
    two = compare.make_compare([masked, plain], tmp_path / "two", size=48, count=4, columns=2)
    with Image.open(one["files"]["sheet"]) as a, Image.open(two["files"]["sheet"]) as b:
        assert b.width > 1.8 * a.width and b.height < 0.75 * a.height
        bottom = np.asarray(a.convert("RGB"), dtype=np.int32)[-60:]
    assert one["diff_max"] > 0
    # the colour bar: the map's darkest and brightest colours are both there, at the bottom
    flat = bottom.reshape(-1, 3)
    for colour in (draw._INFERNO[0], draw._INFERNO[-1]):
        assert (np.abs(flat - np.asarray(colour)).sum(axis=1) <= 20).sum() > 20, colour
    with pytest.raises(BadInput, match="--columns 0"):
        compare.make_compare([masked, plain], tmp_path / "zero", columns=0)
