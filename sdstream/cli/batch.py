"""`sdstream batch`: many runs, each model loaded once.

The options of `generate` are the defaults of every run. They are parsed by generate's own
click command (so the two can't drift apart), then checked by their declarations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..record.sinks import Sink
from .common import Progress, handle_errors, print_json, stderr

HELP = (
    "Run every line of FILE, each into its own run folder under --out; models load once.\n\n"
    'FILE is JSON Lines (one object per line; keys are generate\'s options, e.g. {"prompt": "a fox", "seed": 3, '
    '"mask": "edges", "inject-at-step": [5]}) or plain text (one prompt per line; blank lines and # comments '
    "skipped); - reads stdin.\n\n"
    "Every `generate` option (see sdstream generate --help) given here is the default for all lines; a line's "
    "keys override it. Rerunning the same command skips runs that are complete (--force redoes them). Under "
    "`accelerate launch -m sdstream batch ...` the runs are split across the processes.\n\n"
    "Exit codes: 0 all complete, 1 some failed, 2 bad lines (nothing run), 130 interrupted."
)


def register(app: typer.Typer) -> None:
    app.command(
        "batch",
        help=HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        options_metavar="FILE [OPTIONS] [GENERATE OPTIONS]",
    )(batch)


def batch(
    ctx: typer.Context,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Batch folder: one run folder per line (default: ./outputs/<time>-batch)."),
    ] = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Run the valid lines even if some are bad.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo runs that are already complete in --out.")] = False,
    json: Annotated[bool, typer.Option("--json", help="One JSON line per finished run, then a summary, on stdout.")] = (
        False
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Run every line of FILE into its own run folder under --out (help text: HELP)."""
    file, params = _parse_generate_options(ctx)
    from ..batch import BadLines, run_batch
    from ..batch.distribute import is_main_process
    from .generate import values_from

    main = is_main_process()
    with handle_errors(debug or params.get("debug", False)):
        if params.get("overwrite"):
            from ..errors import BadInput

            raise BadInput("--overwrite: batch reruns what is not complete by itself; --force redoes complete runs too")
        defaults = values_from(params)
        animations = [fmt for fmt in ("gif", "webp") if params.get(fmt)]
        display = _Display(json=json, quiet=quiet, main=main)
        try:
            result = run_batch(
                file, out, defaults, force=force, keep_going=keep_going, animations=animations,
                check=_animation_check(animations), sinks=(display,), on_event=display.event,
            )
        except BadLines as e:
            if main:
                from rich.text import Text

                for line, message in e.errors:  # as text, not markup: a message may quote [brackets]
                    stderr.print(Text.assemble(("Error:", "bold red"), f" line {line}: {message}"))
                stderr.print("Nothing was run. Fix the lines, or pass --keep-going to run the others.")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            display.close()
            if main and not quiet and getattr(e, "batch_result", None) is not None:
                _print_summary(e.batch_result)
            raise
        finally:
            display.close()
        if main and not quiet:
            _print_summary(result)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _parse_generate_options(ctx: typer.Context) -> tuple[str, dict]:
    """(FILE, generate's parsed options) from what batch itself did not take."""
    from typer.main import get_command

    from . import app

    generate = get_command(app).commands["generate"]
    sub = generate.make_context("batch", list(ctx.args), parent=ctx.parent, resilient_parsing=False,
                                allow_extra_args=True)
    if len(sub.args) != 1:
        got = f"got {len(sub.args)}: {' '.join(sub.args)}" if sub.args else "got none"
        raise typer.BadParameter(f"give one batch file (JSON Lines or text, - for stdin); {got}", ctx=ctx,
                                 param_hint="FILE")
    return sub.args[0], sub.params


def _animation_check(animations):
    def check(req) -> None:
        if animations and req.preview == "none":
            from ..errors import BadInput

            raise BadInput(f"--{animations[0]} animates the frames, but --preview none writes none")

    return check


class _Display(Sink):
    """Batch events to the terminal: a progress bar per run and a line when it ends; JSON on stdout."""

    def __init__(self, json: bool, quiet: bool, main: bool):
        import os

        self.json, self.quiet, self.main = json, quiet, main
        self.prefix = "" if main else f"[process {os.environ.get('RANK', '?')}] "
        self.progress: Progress | None = None
        self.bars = main and not quiet and stderr.is_terminal and not _several_processes()
        self.place = ""  # "run 2 of 16 · "

    # each run's own events (a sink of the run)
    def load(self, model) -> None:
        if self.bars:
            self.progress = Progress(prefix=self.place)
            self.progress.load(model)

    def start(self, info) -> None:
        if self.progress:
            self.progress.start(info)

    def step(self, step) -> None:
        if self.progress:
            self.progress.step(step)

    def finish(self, info, outcome) -> None:
        self.close()

    # the batch's events
    def event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "begin":
            self.place = f"run {event['index']} of {event['of']} · "
        elif kind == "run":
            self.close()
            if self.json and self.main:
                print_json({k: event[k] for k in ("event", "line", "status", "run_dir", "seed", "error", "prompt",
                                                  "seconds", "skipped")})
            if not self.quiet and not event.get("gathered"):  # a gathered run was shown by its own process
                stderr.print(self.prefix + _run_line(event), markup=False)
        elif kind == "warning" and self.main and not self.quiet:
            stderr.print(f"Warning: {event['message']}", markup=False)
        elif kind == "summary" and self.json and self.main:
            print_json(event)

    def close(self) -> None:
        if self.progress:
            self.progress.progress.stop()
            self.progress = None


def _several_processes() -> bool:
    from ..batch.distribute import distributed

    return distributed()


def _run_line(row: dict) -> str:
    parts = [f"line {row['line']}", row["status"] + (" (kept)" if row["skipped"] else "")]
    if row["seed"] is not None:
        parts.append(f"seed {row['seed']}")
    if row["seconds"] is not None and not row["skipped"]:
        parts.append(f"{row['seconds']:.1f} s")
    if row["run_dir"]:
        parts.append(row["run_dir"])
    if row["error"]:
        parts.append(row["error"])
    return " · ".join(parts)


def _print_summary(result) -> None:
    from rich.table import Table
    from rich.text import Text

    colour = {"complete": "green", "failed": "red", "interrupted": "yellow", "pending": "dim"}
    cells = [
        (
            str(row["line"]),
            row["prompt"] or "",
            "" if row["seed"] is None else str(row["seed"]),
            row["status"] + (" (kept)" if row["skipped"] else ""),
            "" if row["seconds"] is None else f"{row['seconds']:.1f}",
            Path(row["run_dir"]).name if row["run_dir"] else "",
        )
        for row in result.rows
    ]
    table = Table(title=Text(f"batch {result.out}"), title_justify="left", header_style="bold")
    for k, (name, justify) in enumerate((("line", "right"), ("prompt", "left"), ("seed", "right"),
                                          ("status", "left"), ("seconds", "right"), ("folder", "left"))):
        fixed = name not in ("prompt", "folder")  # these shrink (with …) when the terminal is narrow
        widest = max([len(name)] + [len(c[k]) for c in cells])
        table.add_column(name, justify=justify, no_wrap=fixed, overflow="ellipsis", min_width=widest if fixed else None,
                         max_width=30 if name == "prompt" else None)
    for row, c in zip(result.rows, cells):
        one_line = [Text(text, no_wrap=True, overflow="ellipsis") for text in (c[1], c[5])]
        table.add_row(c[0], one_line[0], c[2], Text(c[3], style=colour.get(row["status"], "")), c[4], one_line[1])
    stderr.print(table)
    for row in result.rows:
        if row["error"]:
            stderr.print(f"line {row['line']}: {row['error']}", soft_wrap=True, markup=False, style="red")
    counts = result.counts
    done = ", ".join(f"{counts[k]} {k}" for k in ("complete", "failed", "interrupted", "pending") if counts[k])
    kept = f" ({counts['skipped']} kept from before)" if counts["skipped"] else ""
    stderr.print(f"{done}{kept} · {result.out / 'batch.json'}", markup=False)
