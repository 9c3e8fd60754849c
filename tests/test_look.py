"""animate, sheet, compare, show: on real tiny runs made once for this module."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image, ImageSequence

import sdstream
from sdstream import GenerationRequest
from sdstream.views import animate, compare, draw, sheet

from conftest import ROOT, error_line

STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """a and b: same seed (same pixels); c: another seed and fewer steps."""
    root = tmp_path_factory.mktemp("runs")
    a, b, c = root / "a", root / "b", root / "c"
    for seed, steps, out in [(1, STEPS, a), (1, STEPS, b), (2, 6, c)]:
        sdstream.run(GenerationRequest(prompt="a red circle", model="tiny", seed=seed, steps=steps), out)
    return a, b, c


def test_animate_gif_frames_size_and_hold(runs, tmp_path, cli):
    a = runs[0]
    code, stdout, stderr = cli("animate", str(a), "--size", "64", "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    path = a / "animation.gif"
    assert info["animation"] == str(path) and info["frames"] == STEPS
    with Image.open(path) as im:
        assert im.size == (64, 64) and im.info["loop"] == 0
        durations = [f.info["duration"] for f in ImageSequence.Iterator(im)]
    # one frame per recorded step; the last is held (a longer duration, not extra frames)
    assert len(durations) == STEPS
    assert durations[:-1] == [100] * (STEPS - 1) and durations[-1] == 100 + 1000 * draw.HOLD_SECONDS

    # never overwritten silently
    assert "exists" in error_line(cli("animate", str(a)))

    # --every keeps the last frame; webp by --out suffix; --no-loop
    out = tmp_path / "x" / "anim.webp"
    anim = animate.make_animation(a, None, out=out, every=3, size=16, loop=False, fps=5)
    assert anim.path == out and anim.steps == [1, 4, 7, 8]
    with Image.open(out) as im:
        assert im.format == "WEBP" and im.n_frames == 4 and im.size == (16, 16)


def test_sheet_is_a_grid_of_cells(runs, tmp_path, cli):
    a = runs[0]
    out = tmp_path / "sheet.png"
    code, stdout, stderr = cli("sheet", str(a), "--steps", "1,2,5,8", "--columns", "3", "--size", "48", "-o", str(out),
                               "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["steps"] == [1, 2, 5, 8] and (info["columns"], info["rows"]) == (3, 2)
    cell_w, cell_h = info["cell"]
    assert cell_w == 48 and cell_h > 48  # the picture, and its label strip under it
    with Image.open(out) as im:
        grid_h = 2 * cell_h + 3 * draw.GAP
        assert im.size[0] == 3 * cell_w + 4 * draw.GAP and im.size[1] > grid_h  # a title line above the grid
        assert im.size == (info["width"], info["height"])

    made = sheet.make_sheet(a, count=3, size=32, out=tmp_path / "s3.png")
    assert made.steps == [1, 5, 8] and made.picture == (32, 32)
    assert made.size[0] == 2 * made.cell[0] + 3 * draw.GAP
    assert made.boxes[2][1] - made.boxes[0][1] == made.cell[1] + draw.GAP  # the third cell starts the second row

    assert "step 9" in error_line(cli("sheet", str(a), "--steps", "1,9", "-o", str(tmp_path / "n.png")))


def test_compare_identical_runs_differ_nowhere(runs, tmp_path, cli):
    a, b, _ = runs
    out = tmp_path / "cmp"
    code, stdout, stderr = cli("compare", str(a), str(b), "--out", str(out), "--size", "32", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert [s["steps"] for s in result["steps"]] == [[i, i] for i in range(1, STEPS + 1)]
    assert all(s["mad"] == [0.0] for s in result["steps"]) and result["diff_max"] == 0.0
    assert json.loads((out / "compare.json").read_text()) == result
    assert len(list((out / "diff").glob("step-*.png"))) == STEPS
    with Image.open(out / "compare.gif") as im:
        assert im.n_frames >= 1 and im.width == 3 * result["cell"][0] + 4 * draw.GAP  # A, B and |B - A|
    assert 32 <= result["cell"][0] <= 64
    assert result["letters"] == ["A", "B"] and result["labels"] == ["a", "b"]  # same options: named by folder
    assert (out / "sheet.png").is_file()
    # a non-empty --out is refused
    assert "not empty" in error_line(cli("compare", str(a), str(b), "--out", str(out)))


def test_compare_different_step_counts_needs_align(runs, tmp_path, cli):
    a, _, c = runs
    line = error_line(cli("compare", str(a), str(c), "--out", str(tmp_path / "no")))
    assert "--align" in line
    assert not (tmp_path / "no").exists()

    by_index = compare.make_compare([a, c], tmp_path / "i", align="index", size=16)
    assert len(by_index["steps"]) == 6 and all(s["mad"][0] > 0 for s in by_index["steps"])
    by_progress = compare.make_compare([a, c], tmp_path / "p", align="progress", size=16)
    assert [s["steps"][0] for s in by_progress["steps"]] == list(range(1, STEPS + 1))
    assert by_progress["steps"][-1]["steps"] == [STEPS, 6]


def test_show(runs, cli):
    a = runs[0]
    code, stdout, stderr = cli("show", str(a), "--json")
    assert code == 0, stderr
    assert json.loads(stdout) == json.loads((a / "run.json").read_text())
    code, stdout, _ = cli("show", str(a))
    assert code == 0 and "complete" in stdout and "tiny" in stdout
    assert any(ch in stdout for ch in draw.SPARKS)


def test_bad_run_dirs(runs, tmp_path, cli):
    assert "does not exist" in error_line(cli("animate", str(tmp_path / "nope")))
    assert "run.json" in error_line(cli("show", str(tmp_path)))
    empty = tmp_path / "empty"
    shutil.copytree(runs[0], empty, ignore=shutil.ignore_patterns("*.gif", "*.webp", "sheet.png"))
    manifest = json.loads((empty / "run.json").read_text())
    (empty / "run.json").write_text(json.dumps({**manifest, "frames": []}))
    assert "no frames" in error_line(cli("sheet", str(empty)))
    assert cli("show", str(empty))[0] == 0  # a run without frames can still be summarised


def test_sparkline_and_spacing():
    assert draw.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == draw.SPARKS
    assert len(draw.sparkline(list(range(1000)), width=40)) == 40
    assert draw.evenly_spaced(list(range(20)), 4) == [0, 6, 13, 19]
    assert draw.every_nth(list(range(8)), 3) == [0, 3, 6, 7]


def test_show_names_the_photo_used_as_the_prompt_and_its_weight(cli, tmp_path):
    import sdstream
    from sdstream import GenerationRequest

    photo = ROOT / "examples" / "photo.png"
    sdstream.run(GenerationRequest(model="tiny", prompt="a red circle", prompt_image=str(photo), image_weight=0.4,
                                   steps=2, width=16, height=16, seed=1), tmp_path / "run")
    code, stdout, stderr = cli("show", str(tmp_path / "run"))
    assert code == 0, stderr
    assert "photo.png" in stdout and "0.4" in stdout, stdout
