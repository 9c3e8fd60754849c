"""The views' pictures: GIFs at the run's image size (latent-size frames enlarged smoothly), labels that keep the
step and timestep at every size in a font that grows with the cell, one-line errors for unknown suffixes, and the
same flags on every view command."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image, ImageSequence

import sdstream
from sdstream import GenerationRequest
from sdstream.views import draw, sheet

from conftest import error_line

STEPS = 6
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run: a tiny run (32x32, frames at the image's size); latent: a copy whose frames are 16x16, as
    --preview approx wrote them before frames were stored at the image's size."""
    root = tmp_path_factory.mktemp("pictures")
    run, latent = root / "run", root / "latent"
    sdstream.run(GenerationRequest(model="tiny", prompt=PROMPT, steps=STEPS, seed=1), run)
    shutil.copytree(run, latent)
    for frame in (latent / "frames").glob("step-*.png"):
        with Image.open(frame) as im:
            im.convert("RGB").resize((16, 16), Image.Resampling.BOX).save(frame)
    return run, latent


def _gif_frames(path):
    with Image.open(path) as im:
        return [f.convert("RGB") for f in ImageSequence.Iterator(im)]


# --------------------------------------------------------------------------- sizes


def test_animation_comes_out_at_the_image_size_not_the_latent_size(runs, tmp_path, cli):
    _, latent = runs
    with Image.open(latent / "frames" / "step-0001.png") as im:
        assert im.size == (16, 16)
    code, stdout, stderr = cli("animate", str(latent), "-o", str(tmp_path / "a.gif"), "--json")
    assert code == 0, stderr
    assert (json.loads(stdout)["width"], json.loads(stdout)["height"]) == (32, 32)
    assert {f.size for f in _gif_frames(tmp_path / "a.gif")} == {(32, 32)}
    # --size wins; webp too
    anim = sdstream.views.animate.make_animation(latent, None, out=tmp_path / "b.webp", size=80)
    with Image.open(anim.path) as im:
        assert im.format == "WEBP" and im.size == (80, 80)


def test_enlarging_is_smooth_up_to_the_image_size_then_nearest():
    import numpy as np

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    up = np.asarray(draw.fit(small, None, (32, 32)), dtype=np.int32)
    assert up.shape == (32, 32, 3)
    blocks = up.reshape(16, 2, 16, 2, 3)
    # not nearest-neighbour: most 2x2 blocks are not four copies of one pixel
    assert (blocks.max(axis=(1, 3)) != blocks.min(axis=(1, 3))).any(axis=-1).mean() > 0.9

    big = np.asarray(draw.fit(small, 128, (32, 32)), dtype=np.int32)  # 16 -> 32 smooth, then x4 nearest
    assert big.shape == (128, 128, 3)
    assert (big.reshape(32, 4, 32, 4, 3) == big[::4, ::4][:, None, :, None]).all()
    assert (big[::4, ::4] == up).all()

    native = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # already the image's size
    crisp = np.asarray(draw.fit(native, 96, (32, 32)), dtype=np.int32)
    assert (crisp.reshape(32, 3, 32, 3, 3) == np.asarray(native)[:, None, :, None]).all()
    assert draw.fit(native, 16, (32, 32)).size == (16, 16)


def test_generate_gif_is_at_the_image_size(tmp_path, cli):
    code, _, stderr = cli("generate", "-m", "tiny", "-p", PROMPT, "--steps", "3", "--seed", "2", "--gif", "-q",
                          "-o", str(tmp_path / "g"))
    assert code == 0, stderr
    assert {f.size for f in _gif_frames(tmp_path / "g" / "animation.gif")} == {(32, 32)}


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("width", [64, 128, 256, 512, 1024])
def test_labels_keep_step_and_timestep_at_every_size(width):
    labels = ["step 1 · t=999", "step 10 · t=601", "step 123 · t=0.000123", "step 7"]
    lay = draw.layout(labels, width)
    fnt = lay.font
    assert lay.width == width  # nothing had to widen the cell
    for text, lines in zip(labels, lay.lines):
        assert " · ".join(lines) == text  # every word kept, in order
        assert all(fnt.getlength(line) <= width for line in lines)
    assert lay.px == draw.font_px(width)  # wrapped, not shrunk
    assert (len(lay.lines[1]) == 1) == (width >= 256)  # one line where it fits, else step over timestep


def test_label_font_grows_with_the_cell_and_never_drops_words():
    assert draw.font_px(64) < draw.font_px(256) < draw.font_px(1024)
    tiny = draw.layout(["step 10 · t=601"], 8)  # far too narrow: the smallest font, and the cell widens
    assert tiny.px == draw.MIN_FONT and tiny.width > 8
    assert [w for line in tiny.lines[0] for w in line.split()] == ["step", "10", "t=601"]


def _line_height(image, box) -> int:
    """The height of the tallest run of pixel rows in BOX that hold text (one line of it)."""
    import numpy as np

    rows = (np.asarray(image.crop(box), dtype=np.int32).max(axis=2) > 120).any(axis=1)
    best = run = 0
    for inked in rows:
        run = run + 1 if inked else 0
        best = max(best, run)
    return best


def test_sheet_labels_scale_with_size(runs, tmp_path):
    run, _ = runs
    small = sheet.make_sheet(run, steps=[1, STEPS], size=64, out=tmp_path / "s.png")
    large = sheet.make_sheet(run, steps=[1, STEPS], size=1024, out=tmp_path / "l.png")
    assert small.picture == (64, 64) and large.picture == (1024, 1024)
    heights = []
    for made in (small, large):
        with Image.open(made.path) as im:
            x0, y0, x1, y1 = made.boxes[0]
            strip = (x0, y0 + made.picture[1], x1, y1)
            heights.append(_line_height(im, strip))
    assert heights[0] >= 6 and heights[1] > 3 * heights[0], heights  # readable small, larger when large


# --------------------------------------------------------------------------- errors and flags


@pytest.mark.parametrize("command,name,expect", [
    ("animate", "a.webp2", "ends in .webp2"),
    ("animate", "a", "has no suffix"),
    ("sheet", "s.bmp", "ends in .bmp"),
    ("grid", "g.gif", "ends in .gif"),
])
def test_unknown_suffix_is_one_line(runs, tmp_path, cli, command, name, expect):
    run, _ = runs
    line = error_line(cli(command, str(run), "-o", str(tmp_path / name)))
    assert expect in line and str(tmp_path / name) in line
    assert not (tmp_path / name).exists()


def test_sheet_suffix_picks_the_format(runs, tmp_path, cli):
    run, _ = runs
    assert cli("sheet", str(run), "-o", str(tmp_path / "s.jpg"), "-q")[0] == 0
    with Image.open(tmp_path / "s.jpg") as im:
        assert im.format == "JPEG"


@pytest.mark.parametrize("command", ["animate", "sheet", "compare", "grid"])
def test_every_view_command_has_the_common_flags(cli, command):
    code, stdout, _ = cli(command, "--help")
    assert code == 0
    for flag in ("--quiet", "-q", "--json", "--out", "-o", "--overwrite"):
        assert flag in stdout, (command, flag)


def test_quiet_prints_nothing_and_json_only_json(runs, tmp_path, cli):
    run, latent = runs
    for args in (["animate", str(run), "-o", str(tmp_path / "a.gif")],
                 ["sheet", str(run), "-o", str(tmp_path / "s.png")],
                 ["compare", str(run), str(latent), "-o", str(tmp_path / "c")],
                 ["grid", str(run), "-o", str(tmp_path / "g.png")]):
        code, stdout, stderr = cli(*args, "-q")
        assert code == 0 and stdout == "" and stderr == "", (args, stderr)
        code, stdout, stderr = cli(*args, "--overwrite", "--json")
        assert code == 0 and stderr == "", (args, stderr)
        json.loads(stdout)
    listed = json.loads((run / "run.json").read_text())["files"]
    assert "sheet.png" not in listed  # written elsewhere: not the run's
    assert cli("sheet", str(run), "-q")[0] == 0 and "sheet.png" in json.loads((run / "run.json").read_text())["files"]
