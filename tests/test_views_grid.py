"""`sdstream grid` (runs laid out by the options they differ in) and `show` of a folder of runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import sdstream
from sdstream import GenerationRequest
from sdstream.views import draw, grid

from conftest import error_line

STEPS, INJECT = 6, 3
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """batch/: four runs, seeds 1 and 2, each with and without a circle mask injected at step 3 (a batch's --out);
    other/: a run that differs in guidance too, one with batch/1's options, and one that failed (no final.png)."""
    root = tmp_path_factory.mktemp("grid")
    batch, other = root / "batch", root / "other"
    base = dict(model="tiny", prompt=PROMPT, steps=STEPS)
    for name, seed, mask in [("1-plain", 1, None), ("2-masked", 1, "circle"), ("3-plain", 2, None),
                             ("4-masked", 2, "circle")]:
        extra = {"mask": mask, "inject_at_step": (INJECT,)} if mask else {}
        sdstream.run(GenerationRequest(**base, seed=seed, **extra), batch / name)
    sdstream.run(GenerationRequest(**base, seed=1, guidance=3), other / "guidance")
    shutil.copytree(batch / "1-plain", other / "same")
    shutil.copytree(batch / "1-plain", other / "failed")
    shutil.copytree(batch / "3-plain", other / "every")  # as if made with --frames-every 2 (the same final image)
    manifest = json.loads((other / "every" / "run.json").read_text())
    manifest["request"]["frames_every"] = 2
    (other / "every" / "run.json").write_text(json.dumps(manifest))
    manifest = json.loads((other / "failed" / "run.json").read_text())
    (other / "failed" / "final.png").unlink()
    (other / "failed" / "run.json").write_text(json.dumps({**manifest, "status": "failed", "image": None}))
    return batch, other


def _ink(image, box):
    """The pixels of BOX that are text (bright grey on the dark background): their (x, y) coordinates."""
    a = np.asarray(image.convert("RGB").crop(box), dtype=np.int32)
    ys, xs = np.nonzero((a.min(axis=2) > 120) & (a.max(axis=2) - a.min(axis=2) < 40))
    return xs + box[0], ys + box[1]


def test_grid_lays_the_runs_out_by_what_differs(runs, tmp_path, cli):
    batch, _ = runs
    out = tmp_path / "g.png"
    code, stdout, stderr = cli("grid", str(batch), "--size", "48", "-o", str(out), "--json")
    assert code == 0 and stderr == "", stderr
    made = json.loads(stdout)
    assert (made["x"], made["y"]) == ("seed", "mask")
    assert made["columns"] == ["seed 1", "seed 2"] and made["rows"] == ["no mask", f"mask circle · inject {INJECT}"]
    assert len(made["cells"]) == 4
    where = {c["run"].rsplit("/", 1)[-1]: (c["row"], c["column"]) for c in made["cells"]}
    assert where == {"1-plain": (0, 0), "3-plain": (0, 1), "2-masked": (1, 0), "4-masked": (1, 1)}

    with Image.open(out) as im:
        im = im.convert("RGB")
        assert im.size == (made["width"], made["height"])
        for c in made["cells"]:  # each cell is that run's final image, scaled as the views scale
            with Image.open(f"{c['run']}/final.png") as final:
                expected = draw.fit(final.convert("RGB"), 48, (32, 32))
            assert np.array_equal(np.asarray(im.crop(c["box"])), np.asarray(expected)), c["run"]
        cells = {(c["row"], c["column"]): c["box"] for c in made["cells"]}
        for h in made["headers"]:  # each header's text is in its box, centred on its column or row
            xs, ys = _ink(im, h["box"])
            assert len(xs) > 10, h
            if h["axis"] == "x":
                column = made["columns"].index(h["text"])
                x0, _, x1, _ = cells[(0, column)]
                assert abs((xs.min() + xs.max()) / 2 - (x0 + x1) / 2) <= 3 and h["box"][3] <= cells[(0, 0)][1]
            else:
                row = made["rows"].index(h["text"])
                _, y0, _, y1 = cells[(row, 0)]
                assert abs((ys.min() + ys.max()) / 2 - (y0 + y1) / 2) <= 4 and h["box"][2] <= cells[(0, 0)][0]
        assert len(_ink(im, (0, 0, im.width, made["headers"][0]["box"][1]))[0]) > 50  # a title above


def test_grid_axes_by_name_and_a_step(runs, tmp_path, cli):
    batch, _ = runs
    made = grid.make_grid([batch], x="--mask", y="seed", step=INJECT, size=64, out=tmp_path / "g.png")
    assert (made.x, made.y, made.step) == ("mask", "seed", INJECT)
    assert made.columns == ["no mask", f"mask circle · inject {INJECT}"] and made.rows == ["seed 1", "seed 2"]
    with Image.open(made.path) as im:
        for c in made.cells:
            badge = int((np.abs(np.asarray(im.convert("RGB").crop(c["box"]), dtype=np.int32)
                                - np.asarray(draw.BADGE)).sum(axis=2) == 0).sum())
            assert (badge > 50) == (c["column"] == 1) and (c["injected"] == [INJECT]) == (c["column"] == 1), c
    line = error_line(cli("grid", str(batch), "--step", "99", "-o", str(tmp_path / "n.png")))
    assert "--step 99" in line and "no frame for step 99" in line and "1-6" in line
    # one option varying: one row
    one = grid.make_grid([batch / "1-plain", batch / "2-masked"], size=32, out=tmp_path / "one.png")
    assert (one.x, one.y, one.rows, len(one.cells)) == ("mask", None, [], 2)


@pytest.mark.parametrize("which,args,expect", [
    ("three", [], ["3 options", "guidance", "seed", "mask"]),
    ("same", [], ["both have seed 1 and no mask", "one run per cell"]),
    ("batch", ["--x", "colour"], ["--x 'colour' is not an option"]),
    ("batch", ["--x", "steps"], ["--x steps: every run has steps 6", "differ in seed, mask"]),
    ("batch", ["--x", "seed", "--y", "seed"], ["both seed"]),
    ("failed", ["--x", "seed"], ["no final image", "--step"]),
])
def test_grid_refusals_are_one_line(runs, tmp_path, cli, which, args, expect):
    batch, other = runs
    dirs = {"three": [batch, other / "guidance"], "same": [batch, other / "same"], "batch": [batch],
            "failed": [batch / "3-plain", other / "failed"]}[which]
    line = error_line(cli("grid", *map(str, dirs), *args, "-o", str(tmp_path / "g.png")))
    for part in expect:
        assert part in line, line
    assert not (tmp_path / "g.png").exists()


def test_options_that_do_not_change_the_picture_are_axes_only_when_named(runs, tmp_path):
    batch, other = runs
    pair = [batch / "1-plain", other / "every"]  # seed 1 and 2; frames every step and every 2nd
    assert (grid.make_grid(pair, size=16, out=tmp_path / "a.png").x, ) == ("seed",)
    named = grid.make_grid(pair, x="frames-every", size=16, out=tmp_path / "b.png")
    assert (named.x, named.y, named.columns) == ("frames_every", "seed", ["frames every 1", "frames every 2"])


def test_grid_default_output_is_new_and_never_overwritten(runs, tmp_path, cli, monkeypatch):
    batch, _ = runs
    monkeypatch.chdir(tmp_path)
    assert cli("grid", str(batch), "--size", "16", "-q") == (0, "", "")
    assert cli("grid", str(batch), "--size", "16", "-q")[0] == 0
    made = sorted((tmp_path / "outputs").glob("*-grid*.png"))
    assert len(made) == 2 and all(p.name.endswith(".png") for p in made)
    target = tmp_path / "mine.png"
    target.write_bytes(b"mine")
    assert "exists" in error_line(cli("grid", str(batch), "-o", str(target)))
    assert target.read_bytes() == b"mine"
    assert cli("grid", str(batch), "-o", str(target), "--overwrite", "-q")[0] == 0
    # written into a run folder: listed as that run's file
    assert cli("grid", str(batch), "-o", str(batch / "1-plain" / "grid.png"), "-q")[0] == 0
    assert "grid.png" in json.loads((batch / "1-plain" / "run.json").read_text())["files"]


def test_show_lists_a_folder_of_runs(runs, cli):
    batch, other = runs
    code, stdout, stderr = cli("show", str(batch))
    assert code == 0, stderr
    for name in ("1-plain", "2-masked", "3-plain", "4-masked", "complete", "(the first)"):
        assert name in stdout
    code, stdout, _ = cli("show", str(batch), "--json")
    listing = json.loads(stdout)
    assert [r["name"] for r in listing["runs"]] == ["1-plain", "2-masked", "3-plain", "4-masked"]
    assert [r["differs"] for r in listing["runs"]] == [
        {}, {"mask": "mask circle", "inject_at_step": f"inject {INJECT}"}, {"seed": "seed 2"},
        {"mask": "mask circle", "inject_at_step": f"inject {INJECT}", "seed": "seed 2"}]
    assert {r["status"] for r in listing["runs"]} == {"complete"} and listing["runs"][0]["seed"] == 1
    code, stdout, _ = cli("show", str(other), "--json")
    assert {r["name"]: r["status"] for r in json.loads(stdout)["runs"]}["failed"] == "failed"
