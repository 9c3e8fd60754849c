"""The code stays lint-clean: ruff, pinned in the test extra, with the rules in pyproject.toml.

Among them TID253: torch, diffusers and friends may not be imported at module level outside the
modules that only load once a run is under way (test_info.py checks the CLI's startup itself).
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
