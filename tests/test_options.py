"""Every option is declared once; the CLI, the server's body, GET / (which /ui builds its form from), the PNG
parameters text and the README's table follow from the declarations."""

from __future__ import annotations

import importlib.util

import pytest

from sdstream.cli.common import RUN_OPTIONS
from sdstream.errors import BadInput
from sdstream.request import OPTIONS, GenerationRequest

from conftest import ROOT


def _tool():
    spec = importlib.util.spec_from_file_location("options_table", ROOT / "tools" / "options_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_made_from_the_declarations():
    tool = _tool()
    readme = tool.in_readme((ROOT / "README.md").read_text())
    assert readme == tool.table(), "run: python tools/options_table.py --write"


def test_the_commands_take_exactly_the_declared_options():
    from typer.main import get_command

    from sdstream.cli import app

    commands = get_command(app).commands
    declared = {**OPTIONS, **RUN_OPTIONS}
    generate = {p.name: p for p in commands["generate"].params if p.name != "help"}
    assert list(generate) == list(declared)
    for name, param in generate.items():
        opt = declared[name]
        assert opt.flag in param.opts and (opt.short is None or opt.short in param.opts)
        assert opt.help in param.help and (not opt.default_text() or f"[default: {opt.default_text()}]" in param.help)
    image_prompt = [p.name for p in commands["image-prompt"].params if p.name != "help"]
    assert image_prompt == ["photo", *(n for n in declared if n != "prompt_image")]


def test_the_server_body_and_its_description_of_the_options_follow_from_them():
    from sdstream.serve.schema import GenerateBody

    served = [opt for opt in OPTIONS.values() if opt.served]
    assert list(GenerateBody.model_fields) == [opt.api_name for opt in served]
    assert {opt.api_name for opt in served} >= {"prompt", "guidance_scale", "noise_mask_type", "inject_at_step",
                                                 "init_image", "start_step", "prompt_image", "seed"}
    described = [opt.describe() for opt in served]
    steps = next(d for d in described if d["name"] == "steps")
    assert steps["range"] == [1, 500] and steps["default"] is None  # one limit, everywhere; the model's default
    assert steps["shown_default"].startswith("the model's: 20 SD 1.x/2.x")
    assert next(d for d in described if d["name"] == "scheduler")["choices"][:3] == ["auto", "ddim", "euler"]
    assert next(d for d in described if d["name"] == "noise_strength")["needs"] == "mask"
    ui = (ROOT / "sdstream" / "static" / "ui.html").read_text()
    assert 'max="1000"' not in ui and 'max="500"' not in ui  # no copy of a limit in the page


def test_the_png_parameters_text_names_every_option_that_has_an_a1111_key():
    from sdstream.record.rundir import a1111_parameters

    req = GenerationRequest(prompt="a red circle", negative_prompt="blue", model="tiny", steps=9, seed=4, eta=0.3,
                            scheduler="ddim", mask="circle", inject_at_step=(3, 5), noise_strength=0.5).validated()
    text = a1111_parameters(req, 32, 32, "tiny")
    assert text.splitlines()[:2] == ["a red circle", "Negative prompt: blue"]
    assert text.splitlines()[2] == ("Steps: 9, Sampler: DDIM, CFG scale: 7.5, Eta: 0.3, Seed: 4, Noise mask: circle, "
                                    "Inject at step: 3 5, Noise strength: 0.5, Size: 32x32, Model: tiny")


@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if o.needs])
def test_an_option_that_needs_another_is_refused_without_it_and_filled_in_with_it(name):
    opt = OPTIONS[name]
    value = {"flag": True, "steps": (2,), "int": 8, "float": 0.5, "picture": "x.png"}.get(opt.kind, "tiny")
    if opt.kind == "choice":
        value = opt.names()[-1]
    with pytest.raises(BadInput, match=f"^{opt.flag} applies only with"):
        GenerationRequest(**{name: value, "preview": "none" if "preview" in opt.needs else "approx",
                             "scheduler": "euler" if "scheduler" in opt.needs else "ddim"}).validated()
    partner, wanted, negated = opt.need()
    other = OPTIONS[partner]
    if wanted and not negated:
        given = wanted.split("|")[0]
    else:
        given = {"picture": "x.png", "flag": True, "names": other.names()[0] if other.kind == "names" else None}.get(
            other.kind, "approx" if partner == "preview" else "circle")
    with_partner = {partner: given, **({"start_step": 1} if partner == "start_image" else {})}
    if name not in ("start_step", "at_step"):  # (which have no default: --start-image, a branch need them)
        assert getattr(GenerationRequest(**with_partner).validated(), name) == opt.default  # the declared default


def test_help_names_values_as_people_write_them(cli):
    """No Python type in any command's help (<bool> on every flag, <list[Path]>): flags show no value, values say
    TEXT, N, X, PATH or what their declaration calls them."""
    import re

    from typer.main import get_command

    from sdstream.cli import app

    for name in ["", *get_command(app).commands]:
        code, out, err = cli(*([name] if name else []), "--help")
        assert code == 0, err
        assert "--help" in out and not re.search(r"<(bool|str|int|float|Path|list\[)", out), (name, out)
