"""Fuzzing: thousands of generated command lines and pictures, with no traceback and nothing of the user's touched.

Marked `fuzz` and left out of the default run (pytest.ini's `-m 'not fuzz'`); run it with

    HF_HUB_OFFLINE=1 python -m pytest -m fuzz tests/test_fuzz.py -q        # FUZZ_EXAMPLES=10000 by default
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdstream.errors import BadInput

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))

VALUES = {  # per option, values a user might type, good and bad
    "--steps": ["1", "2", "0", "-1", "501", "x", "2.5", ""],
    "--guidance": ["1", "5", "-1", "101", "nan", "inf", "x"],
    "--width": ["16", "32", "33", "0", "8", "5000", "x"],
    "--height": ["16", "32", "31", "x"],
    "--seed": ["0", "1", str(2**64 - 1), str(2**64), "-1", "x"],
    "--scheduler": ["ddim", "euler", "pndm", "dpm++-2m-karras", "heun", "DDIM", ""],
    "--eta": ["0", "0.5", "1", "2", "x"],
    "--mask": ["circle", "center_circle", "blob", "{pic}", "{txt}", "{missing}", ""],
    "--inject-at-step": ["1", "2", "1,2", "0", "99", "a", ","],
    "--noise-strength": ["0", "1", "2", "3", "x"],
    "--init-image": ["{pic}", "{txt}", "{missing}", "{dir}", ""],
    "--strength": ["0.5", "1", "0", "1.5", "x"],
    "--start-image": ["{pic}", "{txt}"],
    "--start-step": ["1", "2", "3", "0", "x"],
    "--prompt-image": ["{pic}", "{txt}"],
    "--image-weight": ["0.5", "2", "x"],
    "--preview": ["approx", "vae", "none", "taesd", "x"],
    "--frame-source": ["x0", "latent", "x"],
    "--frames-every": ["1", "2", "0", "x"],
    "--frame-format": ["png", "jpg", "webp", "tiff"],
    "--taesd": ["{dir}", "x/y"],
    "--dtype": ["fp32", "bf16", "fp8"],
    "--device": ["cpu", "gpu", "cuda"],
    "-p": ["a red circle", "a fox", "", "a red circle on a blue background"],
    "--negative-prompt": ["blue", "blurry", ""],
    "-m": ["tiny", "", "no/such", "{dir}"],
    "-o": ["{new}", "{mine}", "{run}", "{txt}"],
}
FLAGS = ["--overwrite", "--gif", "--json", "-q", "--compile", "--cpu-offload", "--stepz"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files of the user's (that nothing may touch) and an earlier run."""
    import sdstream

    root = tmp_path_factory.mktemp("fuzz")
    Image.new("RGB", (20, 12), (200, 30, 30)).save(root / "pic.png")
    (root / "notes.txt").write_text("not a picture")
    (root / "mine").mkdir()
    (root / "mine" / "keep.txt").write_text("the user's")
    (root / "dir").mkdir()
    sdstream.run(sdstream.GenerationRequest(model="tiny", steps=2, seed=1), root / "run")
    return root


def snapshot(root):
    """The user's files (not the runs the fuzzing makes: walking those made each example slower than the last)."""
    mine = [root / "pic.png", root / "notes.txt", *(root / "mine").rglob("*"), *(root / "dir").rglob("*")]
    top = sorted(p.name for p in root.iterdir() if not p.name.startswith(("new", "run")))  # nothing new beside them
    return {"": top, **{str(p.relative_to(root)): p.read_bytes() for p in mine if p.is_file()}}


arguments = st.lists(st.one_of(
    st.sampled_from(list(VALUES)).flatmap(lambda opt: st.tuples(st.just(opt), st.sampled_from(VALUES[opt]))),
    st.sampled_from(FLAGS).map(lambda flag: (flag,)),
), max_size=6)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(args=arguments, counter=st.integers(0, 10**9))
def test_generated_command_lines_give_clean_errors_and_touch_nothing_of_the_users(world, args, counter):
    from sdstream import interrupts
    from sdstream.cli import main

    before = snapshot(world)
    names = dict(pic=world / "pic.png", txt=world / "notes.txt", missing=world / "missing.png", dir=world / "dir",
                 mine=world / "mine", run=world / "run", new=world / f"new-{counter}")
    argv = ["generate", "-m", "tiny", "--steps", "2", "--width", "16", "--height", "16"]  # quick, unless overridden
    for item in args:
        argv += [a.format(**names) for a in item]
    if "-o" not in argv:
        argv += ["-o", str(names["new"])]
    out, err, old = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["sdstream", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = old
        interrupts.reset()
    code, stderr = done.value.code, err.getvalue()
    assert code in (0, 1, 2) and "Traceback" not in stderr, (argv, stderr)
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (argv, stderr)
    assert snapshot(world) == before, argv


formats = st.sampled_from(["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP"])
modes = st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data(), fmt=formats, mode=modes, size=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_generated_pictures_open_as_rgb_or_give_one_clean_error(data, fmt, mode, size):
    from sdstream.inputs import open_image

    buf = io.BytesIO()
    try:
        Image.new(mode, size, data.draw(st.integers(0, 255))).save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # a mode this format can't hold
        return
    blob = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(0, 3))):  # mangle it a little
        if blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    blob = bytes(blob[: data.draw(st.integers(0, len(blob)))]) if data.draw(st.booleans()) else bytes(blob)
    for target in ("RGB", "L"):
        try:
            image = open_image(blob, "--init-image", target)
        except BadInput as e:
            assert str(e).startswith("--init-image (uploaded) ") and "\n" not in str(e)
        else:
            assert image.mode == target
