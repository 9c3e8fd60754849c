"""`sdstream diagnostics`, `models`, `masks`, `--version`: real subprocesses, JSON checked field by field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from PIL import Image

from sdstream import __version__
from sdstream.masks import PATTERNS
from sdstream.models.registry import ALIASES

from conftest import sdstream_cli

HEAVY = ("torch", "diffusers", "transformers")


def test_version():
    r = sdstream_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"sdstream {__version__}\n"


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["diagnostics", "--help"], ["masks"], ["masks", "--json"], ["masks", "--preview"]],
)
def test_light_commands_do_not_import_torch(args, tmp_path):
    if args[-1] == "--preview":
        args = [*args, str(tmp_path)]
    # -X importtime writes one line per imported module to stderr, the module name last.
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdstream", *args],
                       capture_output=True, text=True, timeout=60, env=os.environ)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(line.endswith(" sdstream.cli") for line in lines)  # the measurement works
    heavy = [line for line in lines if line.endswith(tuple(f" {m}" for m in HEAVY))]
    assert heavy == []


def test_masks_json_lists_the_nine_patterns(cli):
    code, stdout, stderr = cli("masks", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert [m["name"] for m in rows] == list(PATTERNS)
    assert all(m["description"] and m["file"] is None for m in rows)
    assert next(m for m in rows if m["name"] == "circle")["aliases"] == ["center_circle", "centre_circle"]


def test_masks_human_output_draws_each_pattern(cli):
    code, stdout, stderr = cli("masks")
    assert code == 0, stderr
    for name, (description, _) in PATTERNS.items():
        assert name in stdout and description.split()[0] in stdout
    assert "█" in stdout


def test_masks_preview_writes_pngs_and_never_replaces_the_users(cli, tmp_path):
    out = tmp_path / "masks"
    code, stdout, stderr = cli("masks", "--preview", str(out), "--size", "32", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in PATTERNS)
    assert [m["file"] for m in rows] == [str(out / f"{name}.png") for name in PATTERNS]
    circle = Image.open(out / "circle.png")
    assert circle.size == (32, 32) and circle.mode == "L"
    assert circle.getpixel((16, 16)) == 255 and circle.getpixel((0, 0)) == 0  # white = noise, in the middle
    left = Image.open(out / "left-half.png")
    assert left.getpixel((0, 16)) == 255 and left.getpixel((31, 16)) == 0
    (out / "circle.png").write_bytes(b"the user's own picture")
    code, _, stderr = cli("masks", "--preview", str(out))
    assert code == 2 and "already holds circle.png" in stderr and "--overwrite" in stderr
    assert (out / "circle.png").read_bytes() == b"the user's own picture"
    assert cli("masks", "--preview", str(out), "--overwrite")[0] == 0


def test_masks_bad_size_and_file_as_folder(cli, tmp_path):
    assert cli("masks", "--size", "0")[0] == 2
    afile = tmp_path / "f.png"
    afile.write_bytes(b"x")
    code, _, stderr = cli("masks", "--preview", str(afile))
    assert code == 2
    assert "is a file" in stderr and "Traceback" not in stderr


def test_models_json_sees_the_hub_cache(tmp_path):
    # A fake downloaded sd15 in a private hub cache: a snapshot of symlinks into blobs/, as huggingface_hub writes.
    repo = tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}" + " " * 998)  # 1000 bytes; refs/main adds 6, symlinks nothing
    snapshot = repo / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").symlink_to(repo / "blobs" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")

    r = sdstream_cli("models", "--json", env={"HF_HUB_CACHE": str(tmp_path / "hub"), "SDSTREAM_MODEL": "sd15"})
    assert r.returncode == 0, r.stderr
    rows = {m["alias"]: m for m in json.loads(r.stdout)}
    assert list(rows) == list(ALIASES)
    for alias, (source, family, _) in ALIASES.items():
        assert rows[alias]["source"] == source and rows[alias]["family"] == family
    sd15 = rows["sd15"]
    assert sd15["on_disk"] and sd15["path"] == str(snapshot) and sd15["default"]
    assert sd15["size_bytes"] == 1000  # the blobs: huggingface_hub's own count of the cache
    aesthetic = rows["aesthetic"]
    assert not aesthetic["on_disk"] and aesthetic["path"] is None and aesthetic["size_bytes"] is None
    tiny = rows["tiny"]
    assert tiny["on_disk"] and os.path.isfile(os.path.join(tiny["path"], "model_index.json"))
    assert tiny["size_bytes"] > 100_000


def test_models_human_output(cli):
    code, stdout, stderr = cli("models")
    assert code == 0, stderr
    assert all(alias in stdout for alias in ALIASES)


@pytest.fixture(scope="module")
def report():
    """One full `diagnostics --check --model tiny --json` run (in this process), shared by the checks below."""
    import contextlib
    import io

    from sdstream.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    os.environ["HF_TOKEN"] = "hf_sekrit_do_not_print"
    sys.argv = ["sdstream", "diagnostics", "--check", "--model", "tiny", "--json"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = argv
        del os.environ["HF_TOKEN"]
    assert done.value.code == 0, err.getvalue()
    assert "sekrit" not in out.getvalue() and "sekrit" not in err.getvalue()
    return json.loads(out.getvalue())  # stdout is exactly one JSON object


def test_diagnostics_facts(report):
    d = report
    assert d["sdstream"] == __version__
    assert d["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert d["libraries"]["torch"] == metadata.version("torch")
    assert d["libraries"]["diffusers"] == metadata.version("diffusers")
    assert d["cpu"]["logical_cores"] >= 1 and d["cpu"]["ram_total_bytes"] > 0
    cuda = d["cuda"]
    assert cuda["available"] == bool(cuda["devices"])
    for gpu in cuda["devices"]:
        assert gpu["name"] and gpu["total_memory_bytes"] > 0 and gpu["free_memory_bytes"] > 0
    assert d["choice"]["device"] == ("cuda" if cuda["available"] else "mps" if d["mps"]["available"] else "cpu")
    assert d["choice"]["dtype"] == ("fp16" if cuda["available"] else "fp32")
    hf = d["huggingface"]
    assert hf["hf_token_set"] is True and hf["offline"] is True and hf["env"]["HF_HUB_OFFLINE"] == "1"
    assert hf["hub_cache"]


def test_diagnostics_check(report):
    check = report["check"]
    assert check["ok"] and check["finite"] and check["error"] is None
    assert check["device"] == report["choice"]["device"] and check["dtype"] == report["choice"]["dtype"]
    assert len(check["step_seconds"]) == check["steps"] == 5
    assert check["steps_per_second"] > 0


def test_diagnostics_model_placement(report):
    model, choice = report["model"], report["choice"]
    parts = {c["name"]: c for c in model["components"]}
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(parts)
    assert parts["unet"]["device"].startswith(choice["device"]) and parts["unet"]["dtype"] == choice["dtype"]
    assert parts["unet"]["parameters"] > 0 and parts["tokenizer"]["parameters"] is None
    assert model["parameters"] == sum(c["parameters"] or 0 for c in model["components"])


def test_diagnostics_tables_render_the_report(report, capsys):
    # The human rendering, in-process on the real report (another subprocess would cost seconds).
    from sdstream.cli.info import _render_diagnostics

    _render_diagnostics(report)
    out = capsys.readouterr().out
    for heading in ("sdstream would use", "Hugging Face", "Model tiny", "Check: 5 steps of tiny"):
        assert heading in out
    assert "unet" in out and "it/s" in out
    if not report["cuda"]["devices"]:
        assert "No GPU" in out


def test_diagnostics_model_not_on_disk_offline(tmp_path):
    r = sdstream_cli("diagnostics", "--model", "sd15", "--json", env={"HF_HUB_CACHE": str(tmp_path)})
    assert r.returncode == 2  # known before anything loads
    assert r.stdout == ""
    assert "not on disk" in r.stderr and "Traceback" not in r.stderr


def test_diagnostics_bad_model_name(cli):
    code, stdout, stderr = cli("diagnostics", "--model", "not a model")
    assert code == 2
    assert "is not an alias" in stderr and stdout == ""
