"""`sdstream batch`: file formats, validation before any run, defaults, resume, --force, load once, accelerate.

Most runs go through the real CLI in this process (conftest's `cli`), so torch is imported once;
the bad-file check and the two-process split run as real subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdstream.batch import BadLines, plan, read_source
from sdstream.request import GenerationRequest

from conftest import ONE_THREAD, json_lines, sdstream_cli

TINY = ["-m", "tiny", "--steps", "3", "--width", "16", "--height", "16"]

MIXED = "\n".join([
    '{"prompt": "a red circle", "seed": 3, "mask": "edges", "inject-at-step": 2}',
    "",
    '{"prompt": "bad", "steps": 0}',
    '{"prompt": "unknown", "colour": "red"}',
    "not json",
    '{"prompt": "a blue square / on black?", "inject_at_step": [1, 2], "mask": "circle", "seed": 5}',
    '{"prompt": "a green triangle", "mask": "circle", "inject_at_step": 9}',
]) + "\n"
PROMPTS = "# prompts for the test\na red circle\n\n   a blue square   \n# done\na black triangle\n"


def manifest(run_dir) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


# ------------------------------------------------------------------------- reading and validating (no torch)


def any_words(tmp_path) -> Path:
    """tiny's components in a folder without its sdstream.json: a model that declares no vocabulary."""
    from sdstream.models.registry import tiny_path

    folder = tmp_path / "any-words"
    folder.mkdir()
    for part in tiny_path().iterdir():
        if part.name != "sdstream.json":
            (folder / part.name).symlink_to(part)
    return folder


def test_formats_keys_and_folder_names(tmp_path):
    runs = read_source(["a", {"prompt": "b", "inject-at-step": 4, "mask": "edges"}])
    assert runs == [(1, {"prompt": "a"}), (2, {"prompt": "b", "inject_at_step": 4, "mask": "edges"})]  # as written
    text = tmp_path / "p.txt"
    text.write_text("\n# comment\na {curly} prompt\n  ../../etc/passwd  \n日本語 ✓\n")
    planned = plan(text, tmp_path / "out", GenerationRequest(model=str(any_words(tmp_path)), seed=1))
    assert [(r.line, r.request.prompt) for r in planned] == [
        (3, "a {curly} prompt"), (4, "../../etc/passwd"), (5, "日本語 ✓")]
    assert [r.run_dir.name for r in planned] == ["0003-a-curly-prompt", "0004-etc-passwd", "0005-run"]
    assert all(r.run_dir.parent == tmp_path / "out" for r in planned)
    assert not (tmp_path / "out").exists()  # planning writes nothing
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(MIXED)
    with pytest.raises(BadLines) as bad:
        plan(jsonl, tmp_path / "out", GenerationRequest(model="tiny"))
    assert [line for line, _ in bad.value.errors] == [3, 4, 5]
    assert "unknown key 'colour'; allowed: prompt, negative_prompt, guidance" in bad.value.errors[1][1]
    kept = plan(jsonl, tmp_path / "out", {"model": "tiny", "steps": 3}, keep_going=True)
    assert [(r.line, r.error is None) for r in kept] == [(1, True), (3, False), (4, False), (5, False), (6, True),
                                                        (7, False)]  # 7: its inject step is past a 3-step run
    assert "--inject-at-step 9 is outside this run's steps" in kept[-1].error


def test_each_process_takes_the_device_accelerate_gives_it():
    from types import SimpleNamespace

    from sdstream.batch.distribute import process_device

    def state(kind, index=None):
        return SimpleNamespace(device=SimpleNamespace(type=kind, index=index))

    assert process_device(None) is None  # a single process: the request's own device ("auto")
    assert [process_device(state(*d)) for d in (("cuda", 1), ("cuda", None), ("cpu", 0), ("mps",), ("xpu", 0))] == [
        "cuda:1", "cuda:0", "cpu", "mps", None]


def test_bad_line_stops_the_batch_before_anything_is_written(tmp_path):
    (tmp_path / "mixed.jsonl").write_text(MIXED)
    out = tmp_path / "out"
    proc = sdstream_cli("batch", "mixed.jsonl", *TINY, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors[0].startswith("Error: line 3: --steps 0 is not allowed: give a whole number from 1 to ")
    assert errors[1].startswith("Error: line 4: unknown key 'colour'; allowed: prompt, negative_prompt")
    assert errors[2].startswith("Error: line 5: not valid JSON")
    assert errors[3].startswith("Error: line 7: --inject-at-step 9 is outside this run's steps")  # known before loading
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()
    proc = sdstream_cli("batch", "mixed.jsonl", "--stepz", "3", cwd=tmp_path)  # generate's options, parsed by generate
    assert proc.returncode == 2 and "Error: No such option: --stepz" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------- runs (in this process)


def test_keep_going_runs_the_valid_lines_from_stdin(cli, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = cli("batch", "-", *TINY, "--out", str(out), "--keep-going", "--json", stdin=MIXED)
    assert code == 1, stderr
    events = json_lines(stdout)
    runs = {e["line"]: e for e in events if e["event"] == "run"}
    assert sorted(runs) == [1, 3, 4, 5, 6, 7] and events[-1]["event"] == "summary"
    assert events[-1]["complete"] == 2 and events[-1]["failed"] == 4 and events[-1]["exit_code"] == 1
    assert (runs[3]["status"], runs[3]["run_dir"]) == ("failed", None)
    assert runs[3]["error"].startswith("--steps 0 is not allowed: give a whole number from 1 to ")
    circle, square = manifest(out / "0001-a-red-circle"), manifest(out / "0006-a-blue-square-on-black")
    assert circle["status"] == square["status"] == "complete"
    assert (circle["injected_at"], circle["request"]["mask"], circle["seed"]) == ([2], "edges", 3)
    assert (square["injected_at"], square["seed"]) == ([1, 2], 5) and runs[6]["seed"] == 5
    # a step outside a 3-step run is a bad line like the others: known before anything runs
    assert runs[7]["status"] == "failed" and "--inject-at-step 9" in runs[7]["error"] and runs[7]["run_dir"] is None
    assert sorted(p.name for p in out.iterdir()) == ["0001-a-red-circle", "0006-a-blue-square-on-black", "batch.json"]
    summary = json.loads((out / "batch.json").read_text())
    assert summary["counts"] == {"runs": 6, "complete": 2, "stopped": 0, "failed": 4, "interrupted": 0, "pending": 0,
                                 "skipped": 0}
    assert [r["line"] for r in summary["rows"]] == [1, 3, 4, 5, 6, 7]
    assert "line 3" in stderr and "0006-a-blue-square-on-black" in stderr  # the summary table


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    (root / "prompts.txt").write_text(PROMPTS)
    return root


PLAIN = ("batch", "prompts.txt", *TINY, "--guidance", "2", "--scheduler", "euler-ancestral", "--seed", "7",
         "--frames-every", "2", "--gif", "--json")


def test_plain_text_prompts_take_the_command_line_defaults(cli, prompts, monkeypatch):
    from sdstream.models import loader

    monkeypatch.chdir(prompts)
    monkeypatch.setattr(loader, "_CACHE", {})  # models loaded by tests before this one (same worker) don't count
    code, stdout, stderr = cli(*PLAIN, "--out", "out")
    assert code == 0, stderr
    dirs = sorted((prompts / "out").glob("0*"))
    assert [d.name for d in dirs] == ["0002-a-red-circle", "0004-a-blue-square", "0006-a-black-triangle"]
    for d, prompt in zip(dirs, ["a red circle", "a blue square", "a black triangle"]):
        m = manifest(d)
        assert m["status"] == "complete" and m["request"]["prompt"] == prompt
        assert {k: m["request"][k] for k in ("model", "steps", "guidance", "scheduler", "seed", "width",
                                             "frames_every")} == {
            "model": "tiny", "steps": 3, "guidance": 2.0, "scheduler": "euler-a", "seed": 7, "width": 16,
            "frames_every": 2}
        assert [f["step"] for f in m["frames"]] == [1, 3] and (d / "animation.gif").is_file()
    # the model was loaded once: the later runs found it in the cache
    assert sum(key[0].startswith("tiny:") for key in loader.loaded_models()) == 1


def test_rerun_redoes_only_what_is_not_complete_and_force_redoes_all(cli, prompts, monkeypatch):
    monkeypatch.chdir(prompts)
    out = prompts / "out"
    if not (out / "batch.json").exists():
        assert cli(*PLAIN, "--out", "out")[0] == 0
    square = out / "0004-a-blue-square" / "run.json"
    m = manifest(square.parent)
    square.write_text(json.dumps({**m, "status": "interrupted"}))
    others = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("000[26]-*/run.json")}

    code, stdout, stderr = cli(*PLAIN, "--out", "out")
    assert code == 0, stderr
    runs = {e["line"]: e for e in json_lines(stdout) if e["event"] == "run"}
    assert {line: e["skipped"] for line, e in runs.items()} == {2: True, 4: False, 6: True}
    assert manifest(square.parent)["status"] == "complete"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in others} == others

    code, stdout, stderr = cli(*PLAIN, "--out", "out", "--force", "--steps", "2")
    assert code == 0, stderr
    assert all(not e["skipped"] for e in json_lines(stdout) if e["event"] == "run")
    assert all(manifest(d)["total_steps"] == 2 for d in out.glob("0*"))

    # a complete run made with other options is not what the line asks for now: it is made again, and said so
    code, stdout, stderr = cli(*PLAIN, "--out", "out")
    assert code == 0 and "made with a different --steps; making it again" in stderr
    assert all(manifest(d)["total_steps"] == 3 for d in out.glob("0*"))


def test_ctrl_c_stops_the_batch_and_a_rerun_finishes_it(cli, tmp_path):
    from sdstream.batch import run_batch

    out, defaults = tmp_path / "out", GenerationRequest(model="tiny", steps=3, width=16, height=16)
    events = []

    def ctrl_c_in_second_run(event):
        if event["event"] == "step" and event["step"] == 2 and sum(e["event"] == "begin" for e in events) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stop:
        run_batch(["red", "green", "blue"], out, defaults, sinks=(ctrl_c_in_second_run,), on_event=events.append)
    result = stop.value.batch_result
    assert [r["status"] for r in result.rows] == ["complete", "interrupted", "pending"] and result.exit_code == 130
    assert manifest(out / "0002-green")["status"] == "interrupted" and not (out / "0003-blue").exists()
    assert json.loads((out / "batch.json").read_text())["interrupted"] is True

    result = run_batch(["red", "green", "blue"], out, defaults)  # the library resumes like the command
    assert [(r["status"], r["skipped"]) for r in result.rows] == [("complete", True), ("complete", False),
                                                                  ("complete", False)]
    assert result.exit_code == 0


def test_bad_generate_options_are_usage_errors(cli, prompts, monkeypatch):
    monkeypatch.chdir(prompts)
    for args, message in ((["--stepz", "3"], "No such option: --stepz"), (["--steps", "3"], "give one batch file"),
                          (["prompts.txt", "--overwrite"], "--force")):
        code, _, stderr = cli("batch", *args)
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


# ------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_runs_and_write_each_once(tmp_path):
    (tmp_path / "five.txt").write_text("red\ngreen\nblue\nyellow\nwhite\n")
    # On a machine without CUDA, `accelerate launch --cpu` starts ONE process (multi-CPU needs mpirun);
    # `--multi_gpu` starts torchrun's processes, which join over gloo on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port())]
    proc = subprocess.run([*launch, "-m", "sdstream", "batch", "five.txt", *TINY, "--json", "--out", "out"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **ONE_THREAD, "CUDA_VISIBLE_DEVICES": ""})  # CPU, also on a 1-GPU box
    if proc.returncode != 0 and "line " not in proc.stderr and ("gloo" in proc.stderr or "rendezvous" in proc.stderr):
        pytest.skip(f"accelerate launch cannot start two processes here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    mine = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("line ")]
    theirs = [line.split()[3] for line in proc.stderr.splitlines() if line.startswith("[process 1] line ")]
    assert mine and theirs and sorted(mine + theirs, key=int) == ["1", "2", "3", "4", "5"]  # each run once
    events = json_lines(proc.stdout)  # only the main process writes stdout
    assert sorted(e["line"] for e in events if e["event"] == "run") == [1, 2, 3, 4, 5]
    assert events[-1]["event"] == "summary" and events[-1]["complete"] == 5
    assert all(manifest(d)["status"] == "complete" for d in (tmp_path / "out").glob("0*"))
    assert json.loads((tmp_path / "out" / "batch.json").read_text())["counts"]["complete"] == 5


def test_values_of_the_wrong_type_are_bad_lines_with_their_numbers(tmp_path):
    lines = [{"prompt": "a red circle"}, {"prompt": 3}, {"prompt": "red", "compile": "yes"}]
    with pytest.raises(BadLines) as bad:
        plan(lines, tmp_path / "out", GenerationRequest(model="tiny"))
    assert [(n, m.split(" is not allowed")[0]) for n, m in bad.value.errors] == [(2, "--prompt 3"),
                                                                                (3, "--compile 'yes'")]
    assert not (tmp_path / "out").exists()


def test_words_the_model_does_not_know_are_bad_lines_before_anything_loads(tmp_path):
    with pytest.raises(BadLines) as bad:
        plan(["a red circle", "a fox", "a blue square", "ok", "a red triangle"], tmp_path / "out",
             GenerationRequest(model="tiny"))
    assert [line for line, _ in bad.value.errors] == [2, 4]
    assert bad.value.errors[0][1].startswith("--prompt: the model 'tiny' does not know 'fox'; it knows only these "
                                             "words: a on background red")
    assert not (tmp_path / "out").exists()


def test_seed_triage_stops_every_run_and_a_rerun_keeps_them(cli, tmp_path):
    """--stop-at-step in a batch: each run stops there with its state (not a failure: exit 0, counted as stopped);
    the same command again keeps them; `resume` finishes one."""
    lines = "".join(json.dumps({"seed": s}) + "\n" for s in (1, 2))
    args = ("batch", "-", *TINY, "-p", "a red circle", "--stop-at-step", "2", "--out", str(tmp_path / "out"), "--json")
    code, stdout, stderr = cli(*args, stdin=lines)
    assert code == 0, stderr
    summary = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert summary["counts"]["stopped"] == 2 and summary["counts"]["complete"] == 0
    runs = sorted((tmp_path / "out").glob("0*"))
    assert [manifest(d)["status"] for d in runs] == ["stopped", "stopped"]
    code, stdout, stderr = cli(*args, stdin=lines)
    assert code == 0, stderr
    rows = json.loads((tmp_path / "out" / "batch.json").read_text())["rows"]
    assert [(r["status"], bool(r["skipped"])) for r in rows] == [("stopped", True)] * 2
    code, _, stderr = cli("resume", str(runs[1]), "-q")
    assert code == 0, stderr
    assert manifest(runs[1])["status"] == "complete" and (runs[1] / "final.png").is_file()


def test_an_empty_batch_file_is_bad_input(cli, tmp_path):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    code, _, stderr = cli("batch", str(tmp_path / "empty.txt"), *TINY, "--out", str(tmp_path / "out"))
    assert code == 2 and "holds no runs" in stderr and not (tmp_path / "out").exists(), stderr
