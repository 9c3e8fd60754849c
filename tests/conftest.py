"""Shared fixtures. Tests use the embedded `tiny` model, real files, real subprocesses and a real server.

torch runs on one thread, here and in every process a test starts: on 2 shared cores, torch's default threads
oversubscribe them and a 1 s test takes 20.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.environ.update(ONE_THREAD)  # inherited by every subprocess a test starts
ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: long generated-input runs (deselected unless asked: -m fuzz)")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes():
    """tools/shapes.py (the world tiny was trained on, and its pixel classifier), imported from its file."""
    import importlib.util

    path = ROOT / "tools" / "shapes.py"
    spec = importlib.util.spec_from_file_location("sdstream_tools_shapes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny():
    """The loaded tiny pipeline (cached in-process like every pipeline; runs of model 'tiny' use this one)."""
    import sdstream

    return sdstream.load("tiny", device="cpu")


def draw(**kw):
    """The final image of a request through the orchestrator (what `generate` writes as final.png)."""
    import sdstream
    from sdstream import GenerationRequest

    return sdstream.generate(GenerationRequest(**{"model": "tiny", "device": "cpu", **kw}))


@pytest.fixture
def cli(capsys):
    """The CLI in this process, as the console script runs it: (exit code, stdout, stderr). Saves the seconds of
    importing torch again in a subprocess; a few tests still run real subprocesses for signals and exit codes."""
    import io

    from sdstream.cli import main

    def call(*args: str, stdin: str | None = None):
        capsys.readouterr()
        old_argv, old_stdin = sys.argv, sys.stdin
        sys.argv = ["sdstream", *map(str, args)]
        sys.stdin = io.StringIO(stdin) if stdin is not None else old_stdin
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        finally:
            sys.argv, sys.stdin = old_argv, old_stdin
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def sdstream_cli(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    """Run `python -m sdstream ARGS` in a real subprocess; returns CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "sdstream", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def error_line(result) -> str:
    """The one `Error: ...` line of a (code, stdout, stderr) that exited 2."""
    code, _, stderr = result
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def read_line(stream, timeout: float = 60) -> str:
    """The next line from a subprocess's pipe, or an AssertionError after TIMEOUT seconds (never a hang)."""
    deadline = time.monotonic() + timeout
    line = b""
    fd = stream.fileno()
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no line within {timeout} s (got {line!r})"
        chunk = os.read(fd, 1)
        if not chunk:
            return line.decode()
        line += chunk
    return line.decode()


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]
