"""`sdstream batch --ray`: a pool of Ray workers on a local cluster of this machine (2 CPUs, so 2 workers).

The cluster is started once for the module (ray.init in this process, which the CLI then uses, as a program
that connected itself would); the CLI runs in this process. Without ray installed (the extra sdstream[ray])
the cluster tests skip; the checks that need no ray still run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import json_lines

TINY = ["-m", "tiny", "--steps", "3", "--width", "16", "--height", "16"]
SIX = "a red circle\na blue square\na green triangle\na yellow circle\na white square\na black triangle\n"


def manifest(run_dir) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    (root / "six.txt").write_text(SIX)
    return root


SWEEP = ("batch", "six.txt", *TINY, "--seed", "4", "--out", "out", "--ray", "--json")


def test_six_lines_on_two_workers_each_run_once_and_complete(cli, cluster, sweep, monkeypatch):
    monkeypatch.chdir(sweep)
    code, stdout, stderr = cli(*SWEEP)
    assert code == 0, stderr
    events = json_lines(stdout)
    runs = [e for e in events if e["event"] == "run"]
    assert sorted(e["line"] for e in runs) == [1, 2, 3, 4, 5, 6]  # each line once
    assert events[-1]["event"] == "summary" and events[-1]["complete"] == 6 and events[-1]["exit_code"] == 0
    summary = json.loads((sweep / "out" / "batch.json").read_text())
    assert summary["counts"] == {"runs": 6, "complete": 6, "stopped": 0, "failed": 0, "interrupted": 0, "pending": 0,
                                 "skipped": 0}
    assert [(r["line"], r["status"], r["attempts"], r["lost_attempts"]) for r in summary["rows"]] == [
        (n, "complete", 1, []) for n in range(1, 7)]
    workers = summary["ray"]["workers"]
    assert len(workers) == 2 and summary["ray"]["device"] == "cpu" and summary["ray"]["workers_lost"] == []
    dirs = sorted((sweep / "out").glob("0*"))
    assert [d.name for d in dirs] == [Path(r["run_dir"]).name for r in summary["rows"]]
    for d, row in zip(dirs, summary["rows"]):
        m = manifest(d)
        assert m["status"] == "complete" and m["seed"] == 4 and m["device"] == "cpu"
        assert f"{m['process']['host']}:{m['process']['pid']}" == row["worker"] in workers  # made by a worker
        assert m["process"]["pid"] != os.getpid()
    assert not list((sweep / "out").rglob("*.tmp")) and not list((sweep / "out").glob(".sdstream-*"))
    assert "Running 6 lines on 2 Ray workers (cpu)" in stderr and "6 complete" in stderr  # and the table


def test_rerun_redoes_nothing(cli, cluster, sweep, monkeypatch):
    monkeypatch.chdir(sweep)
    if not (sweep / "out" / "batch.json").exists():
        assert cli(*SWEEP)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (sweep / "out").rglob("*") if p.is_file() and p.name != "batch.json"}
    code, stdout, stderr = cli(*SWEEP)
    assert code == 0, stderr
    summary = json.loads((sweep / "out" / "batch.json").read_text())
    assert [(r["status"], r["skipped"], r["attempts"]) for r in summary["rows"]] == [("complete", True, 0)] * 6
    assert summary["counts"]["skipped"] == 6 and summary["ray"]["workers"] == []  # no worker was even started
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_killed_worker_has_its_line_run_again_elsewhere(cli, cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = ['{"prompt": "a red circle"}', '{"prompt": "a green triangle", "steps": 30}', '{"prompt": "a blue square"}']
    (tmp_path / "victim.jsonl").write_text("\n".join(lines) + "\n")
    victim, killed = tmp_path / "out" / "0002-a-green-triangle", []

    def kill_the_worker_mid_run():  # once the long line has a frame on disk, SIGKILL the process writing it
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                m = manifest(victim)
                if m["status"] == "running" and any((victim / "frames").glob("step-*.png")):
                    os.kill(m["process"]["pid"], signal.SIGKILL)
                    killed.append(f"{m['process']['host']}:{m['process']['pid']}")
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)

    killer = threading.Thread(target=kill_the_worker_mid_run, daemon=True)
    killer.start()
    # one worker: the line of the one that is killed goes to the worker that takes its place
    code, stdout, stderr = cli("batch", "victim.jsonl", *TINY, "--out", "out", "--ray", "--ray-workers", "1", "--json")
    killer.join(timeout=5)
    assert killed and code == 0, stderr
    events = json_lines(stdout)
    retry = [e for e in events if e["event"] == "retry"]
    assert [(e["line"], e["attempt"], e["of"], e["worker"]) for e in retry] == [(2, 1, 3, killed[0])]
    assert "Warning: line 2: its worker " in stderr and "running it again (attempt 2 of 3)" in stderr
    summary = json.loads((tmp_path / "out" / "batch.json").read_text())
    rows = {r["line"]: r for r in summary["rows"]}
    assert summary["counts"]["complete"] == 3 and summary["exit_code"] == 0
    assert [rows[n]["attempts"] for n in (1, 2, 3)] == [1, 2, 1]
    assert rows[2]["lost_attempts"] == [f"its worker {killed[0]} died (killed)"] and rows[2]["worker"] != killed[0]
    assert summary["ray"]["workers_lost"] == killed and len(summary["ray"]["workers"]) == 2  # the first, its successor
    m = manifest(victim)  # made again, whole: nothing of the killed attempt is left
    assert m["status"] == "complete" and f"{m['process']['host']}:{m['process']['pid']}" == rows[2]["worker"]
    assert [f["step"] for f in m["frames"]] == list(range(1, 31))
    assert sorted(p.name for p in (victim / "frames").iterdir()) == [f"step-{n:04d}.png" for n in range(1, 31)]
    assert not list((tmp_path / "out").rglob("*.tmp")) and not list((tmp_path / "out").rglob(".*"))


def test_a_worker_that_cannot_see_out_is_refused_before_anything_runs(cli, cluster, tmp_path, monkeypatch):
    from sdstream.batch import ray_pool

    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("red\ngreen\n")
    # the driver leaves its proof under a name the workers don't look for: as if --out were another disk to them
    monkeypatch.setattr(ray_pool, "PROBE", ".sdstream-elsewhere-")
    code, stdout, stderr = cli("batch", "two.txt", *TINY, "--out", "out", "--ray")
    assert code == 2, stderr
    assert "Error: --out 'out': the worker on " in stderr and "does not see the batch folder" in stderr
    assert "every node shares" in stderr and "nothing was run" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # made for the batch, and removed again: nothing was written


# ------------------------------------------------------------------------- no cluster needed


def test_ray_stays_out_of_the_cli_until_a_batch_runs_on_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "250"}  # help on one line per option
    for args in (["--help"], ["batch", "--help"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdstream", *args], capture_output=True,
                              text=True, timeout=60, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert not imported & {"ray", "torch", "diffusers"}, args
    assert "--ray-retries" in proc.stdout and "every node" in proc.stdout


def test_without_the_extra_ray_is_a_usage_error_with_the_pip_line(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("red\ngreen\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code, stdout, stderr = cli("batch", "two.txt", *TINY, "--ray", "auto")
    assert code == 2 and "pip install 'sdstream[ray]'" in stderr and stdout == ""
    assert not (tmp_path / "out").exists()
    code, _, stderr = cli("batch", "two.txt", *TINY, "--ray-workers", "2")
    assert code == 2 and "--ray-workers" in stderr and "only with --ray" in stderr


def test_the_address_after_ray_is_told_from_the_file():
    from sdstream.batch.ray_pool import looks_like_address

    assert [looks_like_address(a) for a in ("auto", "local", "10.0.0.5:6379", "ray://head:10001", "[::1]:6379",
                                             "prompts.txt", "a.jsonl", "-")] == [True] * 5 + [False] * 3


def test_each_worker_proves_it_sees_and_can_write_out(tmp_path):
    from sdstream.batch.ray_pool import PROBE, SweepWorker

    worker = SweepWorker("cpu")
    assert "does not see the batch folder" in worker.probe(str(tmp_path), "token")["error"]  # another machine's disk
    (tmp_path / f"{PROBE}token").write_text("token")
    info = worker.probe(str(tmp_path), "token")
    assert info["error"] is None and info["pid"] == os.getpid() and info["device"] == "cpu"
