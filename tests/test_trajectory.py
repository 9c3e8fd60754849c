"""The trajectory itself: tensors on disk, branch and resume from any step (bit for bit), prompt editing, per-step
measures, redecode and plot."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sdstream
from sdstream import GenerationRequest
from sdstream.core.families import SD
from sdstream.record import orchestrator
from sdstream.record.continuation import branch_of
from sdstream.record.rundir import RunFolder

PROMPT = "a red circle on a blue background"
BASE = dict(model="tiny", prompt=PROMPT, steps=6, guidance=5.0, seed=11, width=16, height=16)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def frames(run_dir) -> dict[int, np.ndarray]:
    manifest = json.loads((run_dir / "run.json").read_text())
    return {f["step"]: pixels(run_dir / f["file"]) for f in manifest["frames"]}


@pytest.fixture(scope="module")
def init_picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "init.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def branch(parent, out, at: int, replay: bool = False, **changes):
    """Branch PARENT at AT into OUT, from its saved state or (REPLAY) computing the steps before AT again."""
    kept = json.loads((parent / "run.json").read_text())["request"]
    req = GenerationRequest(**{**{k: v for k, v in kept.items() if k not in ("stop_at_step",)}, **changes,
                               "parent": str(parent), "at_step": at}).validated()
    continuation = branch_of(req)
    assert (continuation.state is not None) == (at > continuation.parent.first_step)
    if replay:
        continuation = dataclasses.replace(continuation, state=None)
    return orchestrator.run(req, [RunFolder(out)], continuation=continuation)


@pytest.mark.parametrize("scheduler", SD.schedulers)
def test_a_branch_with_nothing_changed_is_its_parent_bit_for_bit(tmp_path, init_picture, scheduler):
    at = 4
    for kind, extra in (("txt2img, injected before K", dict(mask="circle", inject_at_step=(2,))),
                        ("img2img", dict(init_image=str(init_picture), strength=0.9))):
        parent = tmp_path / f"parent-{kind[:3]}"
        sdstream.run(GenerationRequest(**BASE, scheduler=scheduler, save_state=True, **extra), parent)
        for replay in (False, True):
            out = tmp_path / f"branch-{kind[:3]}-{replay}"
            result = branch(parent, out, at, replay=replay)
            assert np.array_equal(pixels(result.image_path), pixels(parent / "final.png")), (kind, replay)
            mine, theirs = frames(out), frames(parent)
            assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine), kind
            manifest = json.loads((out / "run.json").read_text())
            assert manifest["branch"] == {"parent": str(parent), "at_step": at, "from_state": not replay}
            assert len(manifest["timings"]["steps"]) == manifest["total_steps"] - at + 1  # only K... computed


def test_a_branch_keeps_its_parents_frames_before_k_and_changes_after(tmp_path):
    parent = tmp_path / "parent"
    sdstream.run(GenerationRequest(**BASE, save_state=True), parent)
    branch(parent, tmp_path / "green", 3, prompt="a green circle on a blue background", guidance=7.0, seed=5)
    mine, theirs = frames(tmp_path / "green"), frames(parent)
    assert all(np.array_equal(mine[k], theirs[k]) for k in (1, 2))
    assert os.path.samefile(tmp_path / "green" / "frames" / "step-0001.png", parent / "frames" / "step-0001.png")
    assert not np.array_equal(pixels(tmp_path / "green" / "final.png"), pixels(parent / "final.png"))
    request = json.loads((tmp_path / "green" / "run.json").read_text())["request"]
    assert (request["parent"], request["at_step"], request["prompt"]) == (str(parent), 3, "a green circle on a "
                                                                         "blue background")


def test_stop_then_resume_is_the_uninterrupted_run(cli, tmp_path):
    plain = sdstream.run(GenerationRequest(**BASE, scheduler="dpm++-2m", mask="edges", inject_at_step=(5,)),
                         tmp_path / "plain")
    code, _, stderr = cli("generate", "-m", "tiny", "-p", PROMPT, "--steps", "6", "--guidance", "5", "--seed", "11",
                          "--width", "16", "--height", "16", "--scheduler", "dpm++-2m", "--mask", "edges",
                          "--inject-at-step", "5", "--stop-at-step", "3", "-q", "-o", str(tmp_path / "run"))
    assert code == 0, stderr
    stopped = json.loads((tmp_path / "run" / "run.json").read_text())
    assert stopped["status"] == "stopped" and [s["step"] for s in stopped["states"]] == [3]
    assert not (tmp_path / "run" / "final.png").exists()
    assert sdstream.open_run(tmp_path / "run").status == "stopped"
    code, _, stderr = cli("resume", str(tmp_path / "run"), "-q")
    assert code == 0, stderr
    done = json.loads((tmp_path / "run" / "run.json").read_text())
    assert done["status"] == "complete" and [f["step"] for f in done["frames"]] == list(range(1, 7))
    assert np.array_equal(pixels(tmp_path / "run" / "final.png"), pixels(plain.image_path))
    assert frames(tmp_path / "run").keys() == frames(plain.run_dir).keys()
    assert all(np.array_equal(frames(tmp_path / "run")[k], frames(plain.run_dir)[k]) for k in range(1, 7))
    code, _, stderr = cli("resume", str(tmp_path / "run"))
    assert code == 2 and "is complete" in stderr


def as_flags(values: dict) -> list[str]:
    return [str(part) for k, v in values.items() for part in (f"--{k.replace('_', '-')}", v)]


def test_prompt_at_is_a_branch_at_that_step(cli, tmp_path):
    code, _, stderr = cli("generate", *as_flags(BASE), "--prompt-at", "4:a green circle on a blue background",
                          "--prompt-at", "6:a green circle on a blue background", "-o", str(tmp_path / "edited"), "-q")
    assert code == 0, stderr
    edited = sdstream.open_run(tmp_path / "edited")
    assert edited.manifest["request"]["prompt_at"] == [[4, "a green circle on a blue background"],
                                                       [6, "a green circle on a blue background"]]
    parent = sdstream.run(GenerationRequest(**BASE, save_state=True), tmp_path / "parent")
    branched = branch(parent.run_dir, tmp_path / "branch", 4, prompt="a green circle on a blue background")
    assert np.array_equal(pixels(edited.dir / "final.png"), pixels(branched.image_path))
    text = Image.open(edited.dir / "final.png").text["parameters"]
    assert 'Prompt at: "4:a green circle on a blue background' in text


def test_tensors_are_kept_as_documented_and_read_back(cli, tmp_path):
    code, _, stderr = cli("generate", *as_flags(BASE), "--save-tensors", "latents,x0", "--save-tensors", "eps",
                          "-o", str(tmp_path / "cli"), "-q")
    assert code == 0, stderr
    assert set(sdstream.open_run(tmp_path / "cli").tensors(2)) == {"latents", "x0", "eps"}
    sdstream.run(GenerationRequest(**BASE, save_tensors=("all",)), tmp_path / "r")
    run = sdstream.open_run(tmp_path / "r")
    assert [e["step"] for e in run.manifest["tensors"]] == list(range(1, 7))
    t = run.tensors(3)
    assert set(t) == {"latents", "x0", "eps", "eps-cond", "eps-uncond"}
    assert all(v.shape == (4, 8, 8) and v.dtype == torch.float16 for v in t.values())
    with pytest.raises(sdstream.BadInput, match="kept no tensors of step 9"):
        run.tensors(9)


def test_redecode_with_the_vae_is_the_vae_frame(cli, tmp_path):
    sdstream.run(GenerationRequest(**BASE, preview="approx", save_tensors=("x0",), tensor_dtype="run"),
                 tmp_path / "cheap")
    sdstream.run(GenerationRequest(**BASE, preview="vae"), tmp_path / "full")
    code, _, stderr = cli("redecode", str(tmp_path / "cheap"), "--steps", "2,5")
    assert code == 0, stderr
    for step in (2, 5):
        again = pixels(tmp_path / "cheap" / "redecoded" / "vae" / f"step-{step:04d}.png").astype(int)
        assert np.abs(again - frames(tmp_path / "full")[step].astype(int)).max() <= 1
    files = json.loads((tmp_path / "cheap" / "run.json").read_text())["files"]
    assert "redecoded/vae/step-0002.png" in files  # the run's own: --overwrite may replace it


def test_measures_are_in_run_json_and_plot_draws_them(cli, tmp_path):
    from sdstream.views.plot import settling_step

    plain = sdstream.run(GenerationRequest(**{**BASE, "steps": 12}), tmp_path / "plain")
    noisy = sdstream.run(GenerationRequest(**{**BASE, "steps": 12}, mask="circle", inject_at_step=(6,)),
                         tmp_path / "noisy")
    m, n = (json.loads((r.run_dir / "run.json").read_text())["measures"] for r in (plain, noisy))
    assert m["steps"] == list(range(1, 13)) and m["x0_change"][0] is None and all(v > 0 for v in m["x0_change"][1:])
    assert all(v > 0 for v in m["guidance_gap"]) and m["injected_rms"] == [0.0] * 12
    assert n["injected_rms"][5] > 0.1 and n["injected_rms"][:5] == [0.0] * 5
    assert n["x0_change"][5] > m["x0_change"][5]  # the injection moves x0
    assert settling_step({"steps": [1, 2, 3, 4], "x0_change": [None, 0.5, 0.01, 0.005]}) == 3
    assert settling_step({"steps": [1, 2, 3], "x0_change": [None, 0.01, 0.5]}) is None
    code, stdout, stderr = cli("plot", str(plain.run_dir), str(noisy.run_dir), "-o", str(tmp_path / "m.png"), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["labels"] == ["mask none · inject at step none", "mask circle · inject at step 6"]
    assert Image.open(tmp_path / "m.png").size[0] > 800


def test_branch_refuses_what_a_branch_cannot_change(cli, tmp_path):
    sdstream.run(GenerationRequest(**BASE), tmp_path / "parent")
    code, _, stderr = cli("branch", str(tmp_path / "parent"), "--at-step", "3", "--steps", "9",
                          "-o", str(tmp_path / "b"))
    assert code == 2 and "No such option: --steps" in stderr
    code, _, stderr = cli("branch", str(tmp_path / "parent"), "--at-step", "99", "-o", str(tmp_path / "b"))
    assert code == 2 and "--at-step 99 is not allowed: give a step of the parent's run, from 1 to 6" in stderr
    assert not (tmp_path / "b").exists()


def test_branch_says_when_it_replays_the_steps_before_k(cli, tmp_path):
    sdstream.run(GenerationRequest(**BASE), tmp_path / "plain")
    sdstream.run(GenerationRequest(**BASE, save_state=True), tmp_path / "kept")
    code, _, stderr = cli("branch", str(tmp_path / "plain"), "--at-step", "4", "-p", "a green circle", "-o",
                          str(tmp_path / "a"))
    assert code == 0, stderr
    assert "kept no state after step 3 (--save-state): replaying steps 1-3 exactly first" in stderr
    code, _, stderr = cli("branch", str(tmp_path / "kept"), "--at-step", "4", "-p", "a green circle", "-o",
                          str(tmp_path / "b"))
    assert code == 0 and "replaying" not in stderr, stderr


def test_a_large_save_tensors_is_told_before_it_fills_the_disk(cli, tmp_path, monkeypatch):
    from sdstream.record import rundir

    # tiny at 16x16: 4x8x8 latents, 512 bytes in fp16, x 6 steps: 3 KB for latents alone, 15 KB for all five
    monkeypatch.setattr(rundir, "TENSOR_NOTICE_BYTES", 5000)
    args = ("generate", "-m", "tiny", "-p", PROMPT, "--steps", "6", "--width", "16", "--height", "16")
    code, _, stderr = cli(*args, "--save-tensors", "all", "-o", str(tmp_path / "a"))
    assert code == 0 and "--save-tensors will write about 0 MB into" in stderr, stderr
    code, _, stderr = cli(*args, "--save-tensors", "latents", "-o", str(tmp_path / "b"))
    assert code == 0 and "--save-tensors will write" not in stderr, stderr
