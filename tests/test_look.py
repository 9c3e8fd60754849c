"""animate, sheet, compare, show: on real tiny runs made once for this module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageSequence

from sdstream import look

from conftest import sdstream_cli

STEPS = 8


# The three runs go through the real `generate` command, in one subprocess so torch is imported once
# (importing it is ~10 s of each run's ~11 s on CPU).
_GENERATE = """
import json, sys
from sdstream.cli import app
for seed, steps, out in json.loads(sys.argv[1]):
    app(["generate", "-p", "a red circle", "-m", "tiny", "--seed", str(seed), "--steps", str(steps),
         "--quiet", "-o", out], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """a and b: same seed (same pixels); c: another seed and fewer steps."""
    root = tmp_path_factory.mktemp("runs")
    a, b, c = root / "a", root / "b", root / "c"
    todo = [(1, STEPS, str(a)), (1, STEPS, str(b)), (2, 6, str(c))]
    subprocess.run([sys.executable, "-c", _GENERATE, json.dumps(todo)], check=True, timeout=300)
    assert all((d / "run.json").is_file() for d in (a, b, c))
    return a, b, c


def _error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_animate_gif_frames_size_and_hold(runs, tmp_path):
    a = runs[0]
    r = sdstream_cli("animate", str(a), "--size", "64", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    path = a / "animation.gif"
    assert info["animation"] == str(path) and info["frames"] == STEPS
    with Image.open(path) as im:
        assert im.size == (64, 64) and im.info["loop"] == 0
        durations = [f.info["duration"] for f in ImageSequence.Iterator(im)]
    # one frame per recorded step; the last is held (a longer duration, not extra frames)
    assert len(durations) == STEPS
    assert durations[:-1] == [100] * (STEPS - 1) and durations[-1] == 100 + 1000 * look.HOLD_SECONDS

    # never overwritten silently
    assert "exists" in _error_line(sdstream_cli("animate", str(a)))

    # --every keeps the last frame; webp by --out suffix; --no-loop
    out = tmp_path / "x" / "anim.webp"
    anim = look.make_animation(a, None, out=out, every=3, size=16, loop=False, fps=5)
    assert anim.path == out and anim.steps == [1, 4, 7, 8]
    with Image.open(out) as im:
        assert im.format == "WEBP" and im.n_frames == 4 and im.size == (16, 16)


def test_sheet_is_a_grid_of_cells(runs, tmp_path):
    a = runs[0]
    out = tmp_path / "sheet.png"
    r = sdstream_cli("sheet", str(a), "--steps", "1,2,5,8", "--columns", "3", "--size", "48", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == [1, 2, 5, 8]
    cell_w, cell_h = 48, 48 + look.LABEL_H
    with Image.open(out) as im:
        assert im.size == (3 * cell_w + 4 * look.GAP, 2 * cell_h + 3 * look.GAP)

    sheet = look.make_sheet(a, count=3, size=32, out=tmp_path / "s3.png")
    assert sheet.steps == [1, 5, 8]
    assert sheet.size == (2 * 32 + 3 * look.GAP, 2 * (32 + look.LABEL_H) + 3 * look.GAP)

    assert "step 9" in _error_line(sdstream_cli("sheet", str(a), "--steps", "1,9", "-o", str(tmp_path / "n.png")))


def test_compare_identical_runs_differ_nowhere(runs, tmp_path):
    a, b, _ = runs
    out = tmp_path / "cmp"
    r = sdstream_cli("compare", str(a), str(b), "--out", str(out), "--size", "32", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [s["steps"] for s in result["steps"]] == [[i, i] for i in range(1, STEPS + 1)]
    assert all(s["mad"] == [0.0] for s in result["steps"]) and result["diff_max"] == 0.0
    assert json.loads((out / "compare.json").read_text()) == result
    assert len(list((out / "diff").glob("step-*.png"))) == STEPS
    with Image.open(out / "compare.gif") as im:
        assert im.n_frames >= 1 and im.width == 3 * 32 + 4 * look.GAP
    assert (out / "sheet.png").is_file()
    # a non-empty --out is refused
    assert "not empty" in _error_line(sdstream_cli("compare", str(a), str(b), "--out", str(out)))


def test_compare_different_step_counts_needs_align(runs, tmp_path):
    a, _, c = runs
    line = _error_line(sdstream_cli("compare", str(a), str(c), "--out", str(tmp_path / "no")))
    assert "--align" in line
    assert not (tmp_path / "no").exists()

    by_index = look.make_compare([a, c], tmp_path / "i", align="index", size=16)
    assert len(by_index["steps"]) == 6 and all(s["mad"][0] > 0 for s in by_index["steps"])
    by_progress = look.make_compare([a, c], tmp_path / "p", align="progress", size=16)
    assert [s["steps"][0] for s in by_progress["steps"]] == list(range(1, STEPS + 1))
    assert by_progress["steps"][-1]["steps"] == [STEPS, 6]


def test_show(runs):
    a = runs[0]
    r = sdstream_cli("show", str(a), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((a / "run.json").read_text())
    r = sdstream_cli("show", str(a))
    assert r.returncode == 0 and "complete" in r.stdout and "tiny" in r.stdout
    assert any(ch in r.stdout for ch in look.SPARKS)


def test_bad_run_dirs(runs, tmp_path):
    assert "does not exist" in _error_line(sdstream_cli("animate", str(tmp_path / "nope")))
    assert "run.json" in _error_line(sdstream_cli("show", str(tmp_path)))
    empty = tmp_path / "empty"
    shutil.copytree(runs[0], empty, ignore=shutil.ignore_patterns("*.gif", "*.webp", "sheet.png"))
    manifest = json.loads((empty / "run.json").read_text())
    (empty / "run.json").write_text(json.dumps({**manifest, "frames": []}))
    assert "no frames" in _error_line(sdstream_cli("sheet", str(empty)))
    assert sdstream_cli("show", str(empty)).returncode == 0  # a run without frames can still be summarised


def test_sparkline_and_spacing():
    assert look.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == look.SPARKS
    assert len(look.sparkline(list(range(1000)), width=40)) == 40
    assert look.evenly_spaced(list(range(20)), 4) == [0, 6, 13, 19]
    assert look.every_nth(list(range(8)), 3) == [0, 3, 6, 7]
