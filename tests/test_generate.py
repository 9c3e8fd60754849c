"""`sdstream generate` end to end: real subprocesses, real files, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import json_lines, read_line, sdstream_cli


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
    assert steps[2] == {"event": "step", "step": 3, "total_steps": 12, "progress": 25.0, "injected": False,
                        "timestep": steps[2]["timestep"], "frame": str(out / "frames" / "step-0003.png")}
    assert [e["step"] for e in steps if e["injected"]] == [6]
    done = events[-1]
    assert done["event"] == "done" and done["image"] == str(out / "final.png") and done["seed"] == 42


def test_final_png_carries_a1111_parameters(fox):
    out, _ = fox
    info = Image.open(out / "final.png").text
    assert info["parameters"].splitlines()[0] == "a yellow circle on a blue background"
    assert info["parameters"].splitlines()[1] == (
        "Steps: 12, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Noise mask: circle, Inject at step: 6, Noise strength: 1, "
        "Size: 32x32, Model: tiny")
    assert json.loads(info["sdstream"])["seed"] == 42


def test_existing_run_is_not_overwritten_without_flag(fox, cli, tmp_path):
    out, _ = fox
    before = (out / "run.json").read_bytes()
    code, _, stderr = cli("generate", "-m", "tiny", "--steps", "2", "-o", str(out))
    assert code == 2 and "--overwrite" in stderr
    assert (out / "run.json").read_bytes() == before
    # a folder with the user's own files is never cleared, even with --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, stderr = cli("generate", "-m", "tiny", "--steps", "2", "-o", str(mine), "--overwrite")
    assert code == 2 and "not an sdstream run folder" in stderr
    assert (mine / "notes.txt").read_text() == "keep me"


def test_overwrite_frames_every_and_format(cli, tmp_path):
    out = tmp_path / "run"
    for _ in range(2):  # the second time replaces the first run
        code, stdout, stderr = cli("generate", "-m", "tiny", "--steps", "7", "--frames-every", "3", "--frame-format",
                                   "jpg", "--seed", "1", "--quiet", "-o", str(out), "--overwrite")
        assert code == 0, stderr
        assert stderr == "" and stdout == ""
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["step-0001.jpg", "step-0004.jpg", "step-0007.jpg"]


def test_start_image_at_step(cli, tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "run"
    code, stdout, stderr = cli("generate", "-m", "tiny", "--steps", "10", "--start-image", str(tmp_path / "red.png"),
                               "--start-step", "7", "--json", "-o", str(out), "--seed", "2")
    assert code == 0, stderr
    steps = [e["step"] for e in json_lines(stdout) if e["event"] == "step"]
    assert steps == [7, 8, 9, 10]
    assert json_lines(stdout)[-2]["progress"] == 100.0
    assert Image.open(out / "final.png").size == (40, 30)  # the picture's size (a multiple of tiny's factor, 2)


def test_ctrl_c_keeps_frames_and_marks_manifest_interrupted(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sdstream", "generate", "-m", "tiny", "--steps", "400",
                             "--width", "64", "--height", "64", "--json", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while json.loads(read_line(proc.stdout)).get("step") != 3:  # wait until a few steps are done
        pass
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    written = sorted((out / "frames").iterdir())
    assert len(written) >= 3 and len(written) == len(manifest["frames"])
    assert all(Image.open(p).size == (64, 64) for p in written)  # frames at the image's size
    assert not (out / "final.png").exists() and not list(out.rglob("*.tmp"))


# (arguments, what the one-line error says): each exits 2 and writes nothing
BAD = [
    (["--steps", "0"], "--steps 0 is not allowed: give a whole number from 1 to 500"),
    (["--steps", "abc"], "--steps 'abc' is not allowed"),
    (["--scheduler", "heunn"], "--scheduler 'heunn'"),
    (["--mask", "circl"], "--mask 'circl'"),
    (["--mask", "circle", "--inject-at-step", "25"], "--inject-at-step 25 is outside this run's steps"),
    (["--mask", "circle", "--inject-at-step", "5,x"], "--inject-at-step '5,x' is not allowed"),
    (["--inject-at-step", "3"], "--inject-at-step applies only with --mask"),
    (["--noise-strength", "0.5"], "--noise-strength applies only with --mask"),
    (["--noise-strength", "3", "--mask", "edges"], "--noise-strength 3.0 is not allowed"),
    (["--guidance", "-1"], "--guidance -1.0"),
    (["--width", "33"], "--width 33 is not a multiple of 2"),
    (["--init-image", "missing.png"], "--init-image 'missing.png'"),
    (["--init-image", "{img}", "--strength", "1.5"], "--strength 1.5"),
    (["--init-image", "{img}", "--strength", "0.01"], "--strength 0.01"),
    (["--init-image", "{txt}"], "is not an image"),
    (["--start-image", "{img}"], "--start-step"),
    (["--start-image", "{img}", "--start-step", "21"], "--start-step 21"),
    (["--strength", "0.5"], "--strength applies only with --init-image"),
    (["--taesd", "x"], "--taesd applies only with --preview taesd"),
    (["--preview", "none", "--frames-every", "2"], "--frames-every applies only with a --preview other than none"),
    (["--eta", "0.5", "--scheduler", "euler"], "--eta applies only with --scheduler ddim"),
    (["--preview", "none", "--gif"], "--gif animates the frames"),
    (["--model", "./no/such/folder"], "no such folder"),
    (["--model", "{dir}"], "model_index.json is missing"),
    (["--model", ""], "--model '' is empty"),
    (["--model", "compressibility"], "is not on disk and HF_HUB_OFFLINE is set"),
    (["-p", "a fox"], "does not know 'fox'"),
    (["-p", "a red circle " * 1000], "--prompt is 13,000 characters long: at most 10,000"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--dtype", "fp8"], "--dtype 'fp8'"),
    (["--cpu-offload"], "--cpu-offload"),
    (["--frame-format", "tiff"], "--frame-format 'tiff'"),
    (["--seed", "-4"], "--seed -4"),
    (["--stepz", "3"], "No such option: --stepz"),
    (["--out", "{txt}"], "is a file"),
    (["--out", "/proc/sdstream-run"], "cannot be written"),
]
NEEDS_NO_MODEL = [args for args, _ in BAD if args[0] not in ("--device", "--cpu-offload")]


def _fill(args, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir(exist_ok=True)
    args = [a.format(img=tmp_path / "photo.png", txt=tmp_path / "notes.txt", dir=tmp_path / "empty") for a in args]
    return args if "--out" in args else [*args, "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("generate", "-m", "tiny", *_fill(args, tmp_path))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], stderr
    assert stdout == "" and not (tmp_path / "run").exists()


def test_bad_input_needing_no_model_fails_before_torch_in_a_fraction_of_a_second(tmp_path):
    """All the model-free cases above in one fresh process: each exits 2 before torch is imported, quickly."""
    cases = [_fill(args, tmp_path) for args in NEEDS_NO_MODEL]
    script = """
import contextlib, io, json, sys, time
from sdstream.cli import main
out = []
for args in json.loads(sys.argv[1]):
    sys.argv, err, started = ["sdstream", "generate", "-m", "tiny", *args], io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code
    out.append([code, err.getvalue(), time.perf_counter() - started])
print(json.dumps({"results": out, "torch": "torch" in sys.modules}))
"""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["torch"] is False  # nothing on the way to any of these errors imported torch
    assert all(code == 2 and err.startswith("Error: ") for code, err, _ in report["results"]), report
    assert not (tmp_path / "run").exists()
    assert wall < 1.5 + sum(seconds for _, _, seconds in report["results"])  # the start itself is quick
    assert max(seconds for _, _, seconds in report["results"]) < 1.0


def test_library_import_does_not_import_torch():
    code = "import sys, sdstream; sdstream.GenerationRequest; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_help_does_not_import_torch_or_diffusers():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdstream", "generate", "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"}, timeout=60)
    assert proc.returncode == 0 and "--inject-at-step" in proc.stdout
    heavy = [line for line in proc.stderr.splitlines() if line.rstrip().endswith((" torch", " diffusers"))]
    assert heavy == []


@pytest.mark.parametrize("args", [["-m", "sd15"], ["-m", "tiny", "--preview", "taesd"]])
def test_what_is_not_on_disk_with_no_hub_to_ask_fails_at_once(args, tmp_path):
    """Online but with no network (here: a Hub endpoint that refuses), one line at once, not half a minute of
    huggingface_hub's retries; nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {
        "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # port 9 (discard): nobody listens
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sdstream", "generate", *args, "-p", "a red circle", "-o",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started < 10, proc.stderr
    assert "is not on disk and 127.0.0.1 cannot be reached" in proc.stderr and "Retrying" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_preview_none_writes_no_frames_folder(cli, tmp_path):
    code, _, stderr = cli("generate", "-m", "tiny", "-p", "a red circle", "--steps", "2", "--width", "16", "--height",
                          "16", "--preview", "none", "-o", str(tmp_path / "run"))
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final.png", "run.json"]
    assert "frames/" not in stderr
