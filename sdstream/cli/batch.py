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

RAY_PANEL = "Ray (several machines)"
HELP = (
    "Run every line of FILE, each into its own run folder under --out; models load once.\n\n"
    'FILE is JSON Lines (one object per line; keys are generate\'s options, e.g. {"prompt": "a fox", "seed": 3, '
    '"mask": "edges", "inject-at-step": [5]}) or plain text (one prompt per line; blank lines and # comments '
    "skipped); - reads stdin.\n\n"
    "Every `generate` option (see sdstream generate --help) given here is the default for all lines; a line's "
    "keys override it. Rerunning the same command skips runs that are complete (--force redoes them). Under "
    "`accelerate launch -m sdstream batch ...` the runs are split across the processes (of one machine or "
    "several). With --ray they go to a pool of Ray workers, one per GPU (or CPU slot) of the cluster, each "
    "given the next line as it frees up; a line whose worker died runs again on another (--ray-retries).\n\n"
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
        typer.Option("--out", "-o", help="Batch folder: one run folder per line (default: ./outputs/<time>-batch). "
                     "With --ray it must be a folder every node of the cluster sees at the same path (a shared "
                     "file system): each worker checks that before any line runs."),
    ] = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Run the valid lines even if some are bad.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo runs that are already complete in --out.")] = False,
    json: Annotated[bool, typer.Option("--json", help="One JSON line per finished run, then a summary, on stdout.")] = (
        False
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    ray: Annotated[bool, typer.Option(
        "--ray", help="--ray \\[ADDRESS]: run the lines on a Ray cluster (extra: pip install 'sdstream\\[ray]'). "
        "Alone it starts one on this machine; `--ray auto` joins the running one (ray start, RAY_ADDRESS); "
        "`--ray HOST:PORT` or `--ray ray://HOST:PORT` the one there.", rich_help_panel=RAY_PANEL)] = False,
    ray_workers: Annotated[int | None, typer.Option(
        "--ray-workers", min=1, metavar="N", help="How many Ray workers \\[default: one per GPU of the cluster; "
        "one per CPU with --device cpu or when it has no GPU].", rich_help_panel=RAY_PANEL, show_default=False)] = None,
    ray_retries: Annotated[int, typer.Option(
        "--ray-retries", min=0, metavar="N", help="Times a line is run again when its worker dies (then it is "
        "recorded as failed).", rich_help_panel=RAY_PANEL)] = 2,
) -> None:
    """Run every line of FILE into its own run folder under --out (help text: HELP)."""
    file, params, address = _parse_generate_options(ctx, ray)
    given = [name for name in ("ray_workers", "ray_retries")
             if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]  # (click's, or typer's own)
    if given and not ray:
        raise typer.BadParameter("applies only with --ray", ctx=ctx, param_hint="--" + given[0].replace("_", "-"))
    from ..batch import BadLines, run_batch
    from ..batch.distribute import is_main_process
    from .generate import values_from

    main = is_main_process()
    cluster = None
    if ray:
        from ..batch.ray_pool import EXTRA_MISSING, RayCluster, ray_available

        if not ray_available():
            from rich.markup import escape

            stderr.print(f"[bold red]Error:[/] {escape(EXTRA_MISSING)}")
            raise typer.Exit(2)
        cluster = RayCluster(address, ray_workers, ray_retries)
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
                check=_animation_check(animations), sinks=() if ray else (display,), on_event=display.event,
                ray=cluster,
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


def _parse_generate_options(ctx: typer.Context, ray: bool = False) -> tuple[str, dict, str | None]:
    """(FILE, generate's parsed options, the --ray ADDRESS or None) from what batch itself did not take.

    --ray is a flag to click, so an address after it is left with FILE: of two such words, the one that names a
    cluster (auto, local, HOST:PORT, ray://…) and is not a file is the address."""
    from typer.main import get_command

    from . import app

    generate = get_command(app).commands["generate"]
    sub = generate.make_context("batch", list(ctx.args), parent=ctx.parent, resilient_parsing=False,
                                allow_extra_args=True)
    address = None
    if ray and len(sub.args) == 2:
        from ..batch.ray_pool import looks_like_address

        named = [a for a in sub.args if looks_like_address(a) and not Path(a).is_file()]
        if len(named) == 1:
            address = named[0]
            sub.args.remove(address)
    if len(sub.args) != 1:
        got = f"got {len(sub.args)}: {' '.join(sub.args)}" if sub.args else "got none"
        raise typer.BadParameter(f"give one batch file (JSON Lines or text, - for stdin); {got}", ctx=ctx,
                                 param_hint="FILE")
    return sub.args[0], sub.params, address


def _animation_check(animations):
    def check(req) -> None:
        if animations and req.preview == "none":
            from ..errors import BadInput

            raise BadInput(f"--{animations[0]} animates the frames, but --preview none writes none")

    return check


class _Display(Sink):
    """Batch events to the terminal: a progress bar per run (or, on Ray, one over the whole sweep) and a line
    when each run ends; JSON on stdout."""

    def __init__(self, json: bool, quiet: bool, main: bool):
        import os

        self.json, self.quiet, self.main = json, quiet, main
        self.prefix = "" if main else f"[process {os.environ.get('RANK', '?')}] "
        self.progress: Progress | None = None
        self.bars = main and not quiet and stderr.is_terminal and not _several_processes()
        self.place = ""  # "run 2 of 16 · "
        self.sweep = None  # (rich Progress, task) over a Ray sweep
        self.running: list[int] = []  # the lines Ray workers are running now

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
        self._close_run()

    # the batch's events
    def event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "begin":
            self.place = f"run {event['index']} of {event['of']} · "
            if "worker" in event:
                self.running.append(event["line"])
                self._update_sweep()
        elif kind == "run":
            self._close_run()
            if self.json and self.main:
                keys = ("event", "line", "status", "run_dir", "seed", "error", "prompt", "seconds", "skipped",
                        "attempts", "worker")
                print_json({k: event[k] for k in keys if k in event})
            if not self.quiet and not event.get("gathered"):  # a gathered run was shown by its own process
                stderr.print(self.prefix + _run_line(event), markup=False)
            if event["line"] in self.running:
                self.running.remove(event["line"])
                self._update_sweep(advance=1)
        elif kind == "cluster":
            self._start_sweep(event)
        elif kind == "sweep":
            self._start_sweep(event)
        elif kind == "retry":
            if event["line"] in self.running:
                self.running.remove(event["line"])
                self._update_sweep()
            if self.json:
                print_json({k: event[k] for k in ("event", "line", "attempt", "of", "worker", "error")})
            if not self.quiet:
                stderr.print(f"Warning: {event['message']}", markup=False)
        elif kind == "warning" and self.main and not self.quiet:
            stderr.print(f"Warning: {event['message']}", markup=False)
        elif kind == "summary" and self.json and self.main:
            print_json(event)

    def _start_sweep(self, event: dict) -> None:
        """The bar over a Ray sweep: first while the cluster is joined ("cluster"), then over the lines ("sweep")."""
        if event["event"] == "cluster":
            address = event["address"]
            where = "starting a local Ray cluster" if address == "local" else f"joining the Ray cluster at {address}"
            description, total = f"{where}…", None
        else:
            workers = event["workers"]
            hosts = sorted({w.rsplit(":", 1)[0] for w in workers})
            where = f"{len(workers)} Ray worker{'s' * (len(workers) != 1)} ({event['device']}) on {', '.join(hosts)}"
            description, total = f"sweep · {where}", event["runs"]
            if not self.bars and not self.quiet:
                stderr.print(f"Running {event['runs']} line{'s' * (event['runs'] != 1)} on {where}", markup=False)
        if not self.bars:
            return
        if self.sweep is None:
            from rich import progress as rp

            bar = rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                              rp.MofNCompleteColumn(), rp.TextColumn("{task.fields[note]}"), rp.TimeElapsedColumn(),
                              console=stderr, transient=True)
            bar.start()
            self.sweep = (bar, bar.add_task(description, total=total, note=""))
        else:
            bar, task = self.sweep
            bar.reset(task, total=total, description=description, note="")

    def _update_sweep(self, advance: int = 0) -> None:
        if self.sweep:
            bar, task = self.sweep
            shown = ", ".join(map(str, sorted(self.running)[:8])) + ("…" if len(self.running) > 8 else "")
            bar.update(task, advance=advance, note=f"running line{'s' * (len(self.running) > 1)} {shown}"
                       if self.running else "")

    def _close_run(self) -> None:
        if self.progress:
            self.progress.progress.stop()
            self.progress = None

    def close(self) -> None:
        self._close_run()
        if self.sweep:
            self.sweep[0].stop()
            self.sweep = None


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

    from ..batch.run import STATUSES

    colour = {"complete": "green", "stopped": "cyan", "failed": "red", "interrupted": "yellow", "pending": "dim"}
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
    done = ", ".join(f"{counts[k]} {k}" for k in STATUSES if counts[k])
    kept = f" ({counts['skipped']} kept from before)" if counts["skipped"] else ""
    stderr.print(f"{done}{kept} · {result.out / 'batch.json'}", markup=False)
