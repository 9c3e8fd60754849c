"""`sdstream generate` end to end: real subprocesses, real files, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

from conftest import json_lines, sdstream_cli


@pytest.fixture(scope="module")
def fox(tmp_path_factory):
    """One full CLI run with a mask and --json, shared by the checks below."""
    out = tmp_path_factory.mktemp("runs") / "fox"
    proc = sdstream_cli("generate", "-p", "a yellow circle on a blue background", "-m", "tiny", "--mask", "circle",
                        "--inject-at-step", "6", "--seed", "42", "--steps", "12", "--json", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_folder_has_a_frame_per_step_final_image_and_manifest(fox):
    out, _ = fox
    frames = sorted(p.name for p in (out / "frames").iterdir())
    assert frames == [f"step-{i:04d}.png" for i in range(1, 13)]
    assert Image.open(out / "final.png").size == (32, 32)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["error"] is None
    assert manifest["seed"] == 42 and manifest["scheduler"] == "ddim"
    assert manifest["request"]["mask"] == "circle" and manifest["injected_at"] == [6]
    assert manifest["model"] == {"name": "tiny", "alias": "tiny", "kind": "tiny", "location": "tiny"}
    assert len(manifest["timings"]["steps"]) == 12 and manifest["timings"]["load"] is not None
    assert [f["step"] for f in manifest["frames"]] == list(range(1, 13))
    assert set(manifest["versions"]) >= {"sdstream", "torch", "diffusers"}
    assert not [p for p in out.rglob("*.tmp")]


def test_json_events_on_stdout_and_nothing_else(fox):
    out, proc = fox
    events = json_lines(proc.stdout)  # fails if any line is not JSON
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 13))
    assert steps[2] == {"event": "step", "step": 3, "total_steps": 12, "progress": 25.0,
                        "timestep": steps[2]["timestep"], "frame": str(out / "frames" / "step-0003.png")}
    done = events[-1]
    assert done["event"] == "done" and done["image"] == str(out / "final.png") and done["seed"] == 42


def test_final_png_carries_a1111_parameters(fox):
    out, _ = fox
    info = Image.open(out / "final.png").text
    assert info["parameters"].splitlines()[0] == "a yellow circle on a blue background"
    assert "Steps: 12, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 32x32, Model: tiny" in info["parameters"]
    assert json.loads(info["sdstream"])["seed"] == 42


def test_existing_run_is_not_overwritten_without_flag(fox, tmp_path):
    out, _ = fox
    before = (out / "run.json").read_bytes()
    proc = sdstream_cli("generate", "-m", "tiny", "--steps", "2", "-o", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "run.json").read_bytes() == before
    # a folder with the user's own files is never cleared, even with --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = sdstream_cli("generate", "-m", "tiny", "--steps", "2", "-o", str(mine), "--overwrite")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr
    assert (mine / "notes.txt").read_text() == "keep me"


def test_overwrite_frames_every_and_format(tmp_path):
    out = tmp_path / "run"
    for _ in range(2):  # the second time replaces the first run
        proc = sdstream_cli("generate", "-m", "tiny", "--steps", "7", "--frames-every", "3", "--frame-format", "jpg",
                            "--seed", "1", "--quiet", "-o", str(out), "--overwrite")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "" and proc.stdout == ""
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["step-0001.jpg", "step-0004.jpg", "step-0007.jpg"]


def test_start_image_at_step(tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "run"
    proc = sdstream_cli("generate", "-m", "tiny", "--steps", "10", "--start-image", str(tmp_path / "red.png"),
                        "--start-step", "7", "--json", "-o", str(out), "--seed", "2")
    assert proc.returncode == 0, proc.stderr
    steps = [e["step"] for e in json_lines(proc.stdout) if e["event"] == "step"]
    assert steps == [7, 8, 9, 10]
    assert json_lines(proc.stdout)[-2]["progress"] == 100.0


def test_hub_model_not_on_disk_offline_is_a_clear_error(tmp_path):
    proc = sdstream_cli("generate", "-m", "compressibility", "--steps", "2", "-o", str(tmp_path / "x"),
                        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert "kvablack/ddpo-compressibility" in proc.stderr and "--model tiny" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_ctrl_c_keeps_frames_and_marks_manifest_interrupted(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sdstream", "generate", "-m", "tiny", "--steps", "400",
                             "--width", "64", "--height", "64", "--json", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until a few steps are done
        if json.loads(line).get("step") == 3:
            break
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    written = sorted((out / "frames").iterdir())
    assert len(written) >= 3 and len(written) == len(manifest["frames"])
    assert all(Image.open(p).size == (32, 32) for p in written)  # approx frames: latent resolution
    assert not (out / "final.png").exists() and not list(out.rglob("*.tmp"))


BAD = [
    (["--steps", "0"], "--steps 0"),
    (["--scheduler", "heunn"], "--scheduler 'heunn'"),
    (["--mask", "circl"], "--mask 'circl'"),
    (["--mask", "circle", "--inject-at-step", "25"], "--inject-at-step 25"),
    (["--inject-at-step", "3"], "--inject-at-step needs --mask"),
    (["--noise-strength", "3"], "--noise-strength 3"),
    (["--guidance", "-1"], "--guidance -1"),
    (["--width", "33"], "--width 33"),
    (["--init-image", "missing.png"], "--init-image 'missing.png'"),
    (["--init-image", "{img}", "--strength", "1.5"], "--strength 1.5"),
    (["--init-image", "{img}", "--strength", "0.01"], "--strength 0.01"),
    (["--init-image", "{txt}"], "is not an image"),
    (["--start-image", "{img}"], "--start-step"),
    (["--start-image", "{img}", "--start-step", "21"], "--start-step 21"),
    (["--strength", "0.5"], "--strength applies to --init-image"),
    (["--model", "./no/such/folder"], "no such folder"),
    (["--model", "{dir}"], "model_index.json is missing"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--dtype", "fp8"], "--dtype 'fp8'"),
    (["--cpu-offload"], "--cpu-offload"),
    (["--frame-format", "tiff"], "--frame-format 'tiff'"),
    (["--seed", "-4"], "--seed -4"),
    (["--out", "{txt}"], "is a file"),
    (["--out", "/proc/sdstream-run"], "cannot be written"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, expected):
    (tmp_path / "photo.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    args = [a.format(img=tmp_path / "photo.png", txt=tmp_path / "notes.txt", dir=tmp_path / "empty") for a in args]
    out = tmp_path / "run"
    if "--out" not in args:
        args += ["--out", str(out)]
    proc = sdstream_cli("generate", "-m", "tiny", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], proc.stderr
    assert not out.exists()


def test_library_import_does_not_import_torch():
    code = "import sys, sdstream; sdstream.GenerationRequest; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_help_does_not_import_torch_or_diffusers():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdstream", "generate", "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0 and "--inject-at-step" in proc.stdout
    heavy = [line for line in proc.stderr.splitlines() if line.rstrip().endswith((" torch", " diffusers"))]
    assert heavy == []
