"""Shared fixtures. Tests use the embedded `tiny` model, real files and real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def shapes():
    """tools/shapes.py (the world tiny was trained on, and its pixel classifier), imported from its file."""
    import importlib.util

    path = Path(__file__).parents[1] / "tools" / "shapes.py"
    spec = importlib.util.spec_from_file_location("sdstream_tools_shapes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny():
    """The loaded tiny pipeline (cached in-process like every pipeline)."""
    import sdstream

    return sdstream.load("tiny", device="cpu")


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


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]
