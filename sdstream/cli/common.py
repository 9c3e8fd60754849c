"""What every command shares: options made from their declarations, the error boundary, progress and JSON output.

Nothing here imports torch. Options are declared once (request fields in request.py, the run's own options in
RUN_OPTIONS below) and turned into Typer parameters by `parameters()`. Every value arrives as text and is
parsed and checked by its declaration, so a bad value always reads `Error: --steps abc is not allowed: ...`.
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console

from ..errors import SdstreamError
from ..options import Option
from ..record.sinks import Sink

OUTPUT = "Output"
# soft_wrap: a message or a path is never hard-wrapped when stderr is not a terminal (a log file, a pipe)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def _run_option(kind, default, help, **settings) -> Option:
    return Option(kind=kind, default=default, help=help, panel=OUTPUT, **settings)


# The options of a run that are not part of its request: where it goes and what is printed.
RUN_OPTIONS: dict[str, Option] = {name: _run_option(*spec[:3], name=name, **spec[3]) for name, spec in {
    "from_run": ("text", None, "Start from RUN's request (its run.json): the options given here change it.",
                 {"long": "--from", "metavar": "RUN"}),
    "out": ("text", None, "The run folder.", {"short": "-o", "metavar": "DIR",
                                             "shown_default": "a new folder under ./outputs"}),
    "overwrite": ("flag", False, "Replace an earlier run in --out (only the files that run wrote).", {}),
    "gif": ("flag", False, "Also write animation.gif of the frames.", {}),
    "webp": ("flag", False, "Also write animation.webp of the frames.", {}),
    "json": ("flag", False, "One JSON event per line on stdout (everything for people goes to stderr).", {}),
    "quiet": ("flag", False, "Nothing on stderr but errors.", {"short": "-q"}),
    "debug": ("flag", False, "Show tracebacks.", {}),
}.items()}


REPEATABLE = ("steps", "names", "pairs")  # given as often as wanted: --inject-at-step 5 --inject-at-step 8


def parameter(opt: Option) -> inspect.Parameter:
    """OPT as a Typer option: a flag, or text (parsed by the declaration), repeatable for the kinds of lists."""
    names = [opt.flag, *([opt.short] if opt.short else [])]
    default = opt.default_text()
    help = opt.help + (needs_help(opt) if opt.needs else "") + (f" [default: {default}]" if default else "")
    settings = dict(help=help, rich_help_panel=opt.panel, show_default=False)
    if opt.kind == "flag":
        annotation, value = Annotated[bool, typer.Option(*names, metavar="", **settings)], False
    elif opt.kind in REPEATABLE:
        annotation, value = Annotated[list[str] | None, typer.Option(*names, metavar=opt.metavar, **settings)], None
    else:
        annotation, value = Annotated[str | None, typer.Option(*names, metavar=opt.metavar or "TEXT", **settings)], None
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation)


def needs_help(opt: Option) -> str:
    """' Only with --mask.' (or ' Not with --preview none.'): what OPT needs, in its help and the README."""
    other, wanted, negated = opt.need()
    flag, wanted = "--" + other.replace("_", "-"), wanted and wanted.split("|")[0]
    if wanted is None:
        return f" Only with {flag}."
    return f" Not with {flag} {wanted}." if negated else f" Only with {flag} {wanted}."


def given(options: dict[str, Option], params: dict) -> dict:
    """The values the command line gave for OPTIONS, parsed: name -> value (options left out are absent)."""
    values = {}
    for name, opt in options.items():
        raw = params.get(name)
        if raw is None or raw is False or (opt.kind in REPEATABLE and not raw):
            continue
        values[name] = raw if opt.kind == "flag" else opt.parse(raw)
    return values


@contextmanager
def handle_errors(debug: bool = False):
    """Turn exceptions into `Error: …` on stderr and the documented exit codes. Any error that follows an
    interrupt (an import cut short, a library that swallowed it) is reported as the interrupt it is."""
    from .. import interrupts

    try:
        yield
    except KeyboardInterrupt:
        stderr.print("Interrupted." if interrupts.exit_code() == 130 else "Terminated.")
        raise typer.Exit(interrupts.exit_code()) from None
    except Exception as e:
        if interrupts.received() is not None:
            stderr.print("Interrupted." if interrupts.exit_code() == 130 else "Terminated.")
            raise typer.Exit(interrupts.exit_code()) from None
        if isinstance(e, (typer.Exit, typer.Abort)):
            raise
        _report(e, debug)


def _report(e: Exception, debug: bool) -> None:
    if isinstance(e, SdstreamError):
        if debug:
            traceback.print_exc()
        error(str(e))
        if e.hint:
            stderr.print(f"Hint: {e.hint}", markup=False)
        raise typer.Exit(e.exit_code) from None
    if debug:
        traceback.print_exc()
    error(f"{type(e).__name__}: {e}")
    if not debug:
        stderr.print("Run again with --debug for the traceback.")
    raise typer.Exit(1) from None


def error(message: str) -> None:
    """`Error: MESSAGE` on stderr; the message is printed as is (no Rich markup: it may hold brackets)."""
    from rich.text import Text

    stderr.print(Text.assemble(("Error:", "bold red"), " ", message))


def print_json(value) -> None:
    """One JSON value per line on stdout, flushed so a pipe sees each event as it happens.

    A reader that went away (`--json | head -1`) or a closed stdout does not fail the run: the rest of the
    JSON goes nowhere, and the run folder is made as asked."""
    import os

    if sys.stdout is None:  # started with stdout closed (>&-)
        sys.stdout = open(os.devnull, "w")
    try:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # ValueError: the stream is closed
        sys.stdout = open(os.devnull, "w")


class Progress(Sink):
    """A run on stderr: a spinner while the model loads, then a bar with the prompt, step n/N (injected steps
    marked), it/s and the time left; it ends with one line for the run."""

    def __init__(self, prefix: str = "") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.prefix = prefix  # "run 2 of 16 · " in a batch
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeRemainingColumn(), console=stderr,
                                 transient=True)
        self.task, self.info, self.told = None, None, 0

    def notices(self) -> None:
        """Print what the run noted since last time (above the bar)."""
        for notice in self.info.notices[self.told:]:
            self.progress.console.print(notice, markup=False, soft_wrap=True, style="yellow")
        self.told = len(self.info.notices)

    def load(self, model) -> None:
        self.progress.start()
        self.task = self.progress.add_task(f"{self.prefix}loading {model.name}", total=None, note="")

    def start(self, info) -> None:
        prompt = info.request.prompt or ("(photo)" if info.request.prompt_image else "(no prompt)")
        label = prompt if len(prompt) <= 32 else prompt[:31] + "…"
        steps = info.total_steps - info.first_step + 1
        self.progress.reset(self.task, total=steps, description=f"{self.prefix}{label} · seed {info.request.seed}",
                            note="")
        self.info = info
        self.notices()

    def step(self, step) -> None:
        self.progress.advance(self.task)
        speed = self.progress.tasks[0].speed
        note = f"{speed:.1f} it/s" if speed else ""
        if step.event.injected:
            note = f"noise injected at {step.event.step} · {note}"
        self.progress.update(self.task, note=note)
        if len(self.info.notices) > self.told:
            self.notices()

    def finish(self, info, outcome) -> None:
        if self.task is None:  # the run ended before it began loading: nothing was shown
            return
        self.progress.stop()
        if outcome.status != "complete" or info is None:
            return
        steps = info.timings["steps"]
        speed = f" · {len(steps) / sum(steps):.1f} it/s" if steps and sum(steps) else ""
        stderr.print(f"Wrote {info.run_dir}/ (final.png, {'frames/, ' if outcome.frames else ''}run.json) · "
                     f"seed {info.request.seed} · {info.timings['total']:.1f} s{speed}", markup=False)
