"""`sdstream branch`, `resume`, `redecode`, `plot`: working with a recorded trajectory."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from ..record.continuation import MAY_CHANGE, OUTPUT
from ..request import OPTIONS
from .common import RUN_OPTIONS, Progress, given, handle_errors, parameter, print_json, stderr

RunDir = Annotated[Path, typer.Argument(metavar="RUN", help="A run folder (holds run.json).", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="One JSON event per line on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
BRANCH_OPTIONS = {n: o for n, o in OPTIONS.items() if o.cli and (n in MAY_CHANGE or n in OUTPUT)}


def register(app: typer.Typer) -> None:
    app.command("branch", no_args_is_help=True)(branch)
    app.command("resume", no_args_is_help=True)(resume)
    app.command("redecode", no_args_is_help=True)(redecode)
    app.command("plot", no_args_is_help=True)(plot)


def branch(run: Path, at_step: str, **params) -> None:
    """Continue RUN from step K into a new run folder, with another prompt, guidance, noise or seed from K on.

    The steps before K are RUN's: from the state RUN saved after step K-1 (--save-state) only steps K... are
    computed; without it the steps before K are computed again, exactly, and their frames are RUN's own. With
    nothing changed, the branch is RUN again, bit for bit.
    """
    from ..errors import BadInput
    from ..record.continuation import request_of
    from ..record.rundir import open_run
    from .generate import execute

    with handle_errors(params.get("debug", False)):
        step = OPTIONS["at_step"].check(OPTIONS["at_step"].parse(at_step))
        parent = request_of(open_run(run))
        inherited = {n: getattr(parent, n) for n in OPTIONS if n not in ("stop_at_step", "parent", "at_step")}
        from ..request import from_values

        req = from_values({**inherited, **given(BRANCH_OPTIONS, params), "parent": str(run), "at_step": step})
        if req.stop_at_step is not None and req.stop_at_step < step:
            raise BadInput(f"--stop-at-step {req.stop_at_step} comes before --at-step {step}")
        execute(req, params)


def resume(run: RunDir, json: Json = False, quiet: Quiet = False, debug: Debug = False) -> None:
    """Finish RUN in its own folder: a run stopped with --stop-at-step, or interrupted, from the state it kept."""
    from ..record.continuation import resumption_of
    from ..record.orchestrator import run as orchestrate
    from ..record.rundir import RunFolder

    with handle_errors(debug):
        req, continuation = resumption_of(run)
        sinks = [RunFolder(run, resume=True)] + ([] if quiet else [Progress()]) + ([print_json] if json else [])
        orchestrate(req, sinks, continuation=continuation)


def redecode(
    run: RunDir,
    steps: Annotated[str, typer.Option("--steps", metavar="LIST", help="Steps to decode: 5,10,20.")],
    preview: Annotated[str, typer.Option(metavar="P", help="vae, taesd or approx.")] = "vae",
    source: Annotated[str, typer.Option(metavar="SRC", help="x0 or latent: which saved tensor to decode.")] = "x0",
    taesd: Annotated[str | None, typer.Option(metavar="ID|DIR", help="Where --preview taesd loads TAESD from.")] = None,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Pictures of chosen steps from the tensors a run kept (--save-tensors), with another decoder: a run made with
    cheap previews, seen through the full VAE afterwards. Written to RUN/redecoded/<preview>/step-NNNN.png."""
    from ..record.redecode import redecode as make

    with handle_errors(debug):
        written = make(run, OPTIONS["inject_at_step"].parse([steps]), preview, source, taesd)
    if json:
        print_json({"files": [str(p) for p in written]})
    elif not quiet:
        stderr.print(f"Wrote {len(written)} pictures to {written[0].parent}/", markup=False)


def plot(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Run folders, drawn over each other.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", metavar="FILE", help="The PNG (default: a new file under "
                                                                                 "./outputs).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """A chart of the runs' per-step measures: how much x0 still changes, the guidance gap, the latents' spread and
    the noise injected, one line per run."""
    from ..views.plot import make_plot

    with handle_errors(debug):
        result = make_plot(runs, out, overwrite=overwrite)
    if json:
        print_json(result)
    elif not quiet:
        stderr.print(f"Wrote {result['plot']} ({len(runs)} run{'s' * (len(runs) > 1)})", markup=False)


_RUN = inspect.Parameter("run", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=RunDir)
_AT = inspect.Parameter("at_step", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, typer.Option(
    "--at-step", metavar="K", help="The step from which the branch differs: the steps before it are RUN's.")])
branch.__signature__ = inspect.Signature([_RUN, _AT, *(parameter(o) for o in BRANCH_OPTIONS.values()),
                                          *(parameter(o) for n, o in RUN_OPTIONS.items() if n != "from_run")])
branch.__annotations__ = {p.name: p.annotation for p in branch.__signature__.parameters.values()}
