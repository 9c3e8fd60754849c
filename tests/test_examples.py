"""The example scripts run as their usage lines say, on tiny (short runs: STEPS=3), all at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

USAGE = {  # script -> its usage line's argument
    "seed_sweep.sh": "a yellow circle on a blue background",
    "mask_sweep.sh": "a yellow circle on a blue background",
    "strength_sweep.sh": "a white triangle on a black background",
    "gif_per_run.sh": "prompts.txt",  # one prompt a line (the file is made below)
    "seed_triage.sh": "a yellow circle on a blue background",
}


def test_every_example_runs_as_its_usage_line_says(tmp_path):
    prompts = ["a red circle on a blue background", "a white triangle on a black background",
               "a green square on a red background"]
    (tmp_path / "prompts.txt").write_text("\n".join(["# three prompts", *prompts]) + "\n")
    procs = {}
    library = subprocess.Popen([sys.executable, str(ROOT / "examples" / "library.py")], cwd=tmp_path, env=os.environ,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for script, prompt in USAGE.items():
        env = {**os.environ, "STEPS": "4", "OUT": str(tmp_path / script), "SEEDS": "1 2", "STOP": "2", "KEEP": "2"}
        procs[script] = subprocess.Popen(["bash", str(ROOT / "examples" / script), *([prompt] if prompt else [])],
                                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{script}:\n{err}"
        assert "Error" not in err and "Traceback" not in err, f"{script}:\n{err}"
    out, err = library.communicate(timeout=240)
    assert library.returncode == 0 and "noise injected" in out and "complete" in out, err
    assert (tmp_path / "outputs" / "library-example" / "final.png").is_file()
    assert (tmp_path / "seed_sweep.sh" / "compare" / "sheet.png").is_file()
    assert (tmp_path / "mask_sweep.sh" / "compare" / "compare.json").is_file()
    assert (tmp_path / "strength_sweep.sh" / "grid.png").is_file()
    assert len(list((tmp_path / "gif_per_run.sh").glob("*/animation.gif"))) == 3
    triage = tmp_path / "seed_triage.sh"
    assert (triage / "triage.png").is_file()
    assert [json.loads((d / "run.json").read_text())["status"] for d in sorted(triage.glob("0*"))] == [
        "stopped", "complete"]
