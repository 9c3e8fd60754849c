"""One run folder per model family from the command line, as the README's commands make them: a random-weight SDXL,
SD3 and FLUX folder (tests/dummy_sdxl.py, tests/dummy_flow.py; nothing downloaded) run by `sdstream generate` with
the family's defaults, a mask and an injection, then branched at a step; the folders hold what a tiny run holds.
"""

from __future__ import annotations

import json

import dummy_flow
import dummy_sdxl
import pytest
from PIL import Image

PROMPT, SIZE = "a red circle on a blue background", 32
FAMILIES = {"sdxl": "SDXL", "sd3": "SD3", "flux-dev": "FLUX", "flux-schnell": "FLUX"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    made = {kind: dummy_flow.save(root / kind, kind) for kind in ("sd3", "flux-dev", "flux-schnell")}
    return {"sdxl": dummy_sdxl.save(root / "sdxl"), **made}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_generate_and_branch_write_a_run_folder_for_every_family(cli, folders, tmp_path, kind):
    out = tmp_path / "run"
    code, stdout, stderr = cli("generate", "--model", folders[kind], "--prompt", PROMPT, "--width", SIZE, "--height",
                               SIZE, "--steps", 3, "--seed", 2, "--mask", "circle", "--inject-at-step", 2,
                               "--preview", "approx", "--frame-source", "x0", "--save-tensors", "latents,x0",
                               "--out", out, "--json")
    assert code == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert [(e["step"], e["injected"]) for e in steps] == [(1, False), (2, True), (3, False)]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["injected_at"] == [2]
    assert manifest["request"]["scheduler"] == ("ddim" if kind == "sdxl" else "flow-euler")  # auto: the family's
    assert [f["step"] for f in manifest["frames"]] == [1, 2, 3]
    for frame in manifest["frames"]:
        assert Image.open(out / frame["file"]).size == (SIZE, SIZE)
    assert Image.open(out / "final.png").size == (SIZE, SIZE)
    assert sorted(p.name for p in (out / "tensors").iterdir()) == [f"step-{k:04d}.safetensors" for k in (1, 2, 3)]

    # a branch at step 3 with nothing changed ends where its parent ended
    branch = tmp_path / "branch"
    code, _, stderr = cli("branch", out, "--at-step", 3, "--out", branch)
    assert code == 0, stderr
    child = json.loads((branch / "run.json").read_text())
    assert child["status"] == "complete" and child["branch"]["at_step"] == 3
    assert Image.open(branch / "final.png").tobytes() == Image.open(out / "final.png").tobytes()
