"""`accelerate launch` across machines, on loopback: two launchers on this machine, each "a machine" of one
process (--num_machines 2, --machine_rank 0 and 1, CPU and gloo), split the lines of one batch between them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ONE_THREAD, json_lines

TINY = ["-m", "tiny", "--steps", "3", "--width", "16", "--height", "16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(args: list[str], cwds: tuple[Path, Path], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """`accelerate launch --machine_rank R ... -m sdstream ARGS` for R = 0 and 1, at once, in CWDS[R]."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    env = {**os.environ, **ONE_THREAD, "CUDA_VISIBLE_DEVICES": ""}  # CPU and gloo, also on a machine with a GPU
    machines = [subprocess.Popen([*launch, "--machine_rank", str(rank), "-m", "sdstream", *args], cwd=cwds[rank],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    done = []
    try:
        for proc in machines:
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in machines:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if any(p.returncode for p in done) and any("rendezvous" in p.stderr or "gloo" in p.stderr for p in done) and not \
            any("Error: " in p.stderr for p in done):
        pytest.skip(f"accelerate launch cannot join two machines here: {done[0].stderr.strip().splitlines()[-1]}")
    return done


def test_two_machines_split_the_lines_and_the_main_one_sums_up(tmp_path):
    (tmp_path / "five.txt").write_text("red\ngreen\nblue\nyellow\nwhite\n")
    first, second = two_machines(["batch", "five.txt", *TINY, "--json", "--out", "out"], (tmp_path, tmp_path))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    mine = [line.split()[1] for line in first.stderr.splitlines() if line.startswith("line ")]
    theirs = [line.split()[3] for line in second.stderr.splitlines() if line.startswith("[process 1] line ")]
    assert mine and theirs and sorted(mine + theirs, key=int) == ["1", "2", "3", "4", "5"]  # each line once
    assert second.stdout == ""  # only the main process (machine 0, rank 0) writes stdout and the summary
    events = json_lines(first.stdout)
    assert sorted(e["line"] for e in events if e["event"] == "run") == [1, 2, 3, 4, 5]
    assert events[-1]["event"] == "summary" and events[-1]["complete"] == 5
    out = tmp_path / "out"
    pids = {json.loads((d / "run.json").read_text())["process"]["pid"] for d in out.glob("0*")}
    assert len(pids) == 2 and all(json.loads((d / "run.json").read_text())["status"] == "complete"
                                  for d in out.glob("0*"))
    assert json.loads((out / "batch.json").read_text())["counts"]["complete"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["0001-red", "0002-green", "0003-blue", "0004-yellow",
                                                     "0005-white", "batch.json"]  # the shared-folder check left none


def test_machines_that_do_not_share_out_are_refused_before_anything_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"  # `--out out` is then a different folder for each "machine"
    for cwd in (a, b):
        cwd.mkdir()
        (cwd / "two.txt").write_text("red\ngreen\n")
    first, second = two_machines(["batch", "two.txt", *TINY, "--out", "out"], (a, b))
    for proc in (first, second):
        assert proc.returncode != 0
        assert "Error: --out 'out': process 1 (on " in proc.stderr and "a file system they share" in proc.stderr
    assert not list((a / "out").iterdir()) and not list((b / "out").iterdir())  # nothing ran
