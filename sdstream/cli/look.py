"""`sdstream animate`, `sheet`, `compare`, `grid`, `show`: looking at finished runs.

The pictures are made in sdstream.views (Pillow and numpy, no torch); this module only parses
flags, maps errors to exit codes and prints. Paths written go to stderr, or as JSON to stdout.
Every command that writes a picture takes the same --out/-o, --overwrite, --json and --quiet/-q.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import handle_errors, print_json, stderr


def register(app: typer.Typer) -> None:
    app.command("animate")(animate)
    app.command("sheet")(sheet)
    app.command("compare")(compare)
    app.command("grid")(grid)
    app.command("show")(show)


RunDir = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run folder (holds run.json).", show_default=False)]
RunDirs = Annotated[list[Path], typer.Argument(
    metavar="RUN_DIR...", show_default=False,
    help="Run folders, or folders of run folders (a batch's --out).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON object on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output file.")]


def _wrote(quiet: bool, message: str) -> None:
    if not quiet:
        stderr.print(message, markup=False, soft_wrap=True)


def animate(
    run_dir: RunDir,
    format: Annotated[
        str | None, typer.Option("--format", "-f", help="gif or webp (default: from --out's suffix, else gif).")
    ] = None,
    fps: Annotated[float, typer.Option(help="Frames per second (at most 50).")] = 10,
    every: Annotated[int, typer.Option(help="Use every Nth recorded frame (the last and the injected always).")] = 1,
    size: Annotated[
        int | None,
        typer.Option(help="Longer side in pixels (default: the run's image size; frames at latent size are "
                          "enlarged smoothly to it)."),
    ] = None,
    caption: Annotated[bool, typer.Option(help="Caption each frame with its step and timestep.")] = False,
    badge: Annotated[bool, typer.Option("--badge/--no-badge",
                                        help="Mark the frames that show an injection of noise.")] = True,
    loop: Annotated[bool, typer.Option("--loop/--no-loop", help="Loop forever, or play once.")] = True,
    hold: Annotated[float, typer.Option(help="Seconds the last frame stays on screen beyond 1/fps.")] = 1.0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (.gif or .webp) instead of "
                                                      "RUN_DIR/animation.<format>.")
    ] = None,
    overwrite: Overwrite = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Animate a run's frames (one per step, the last held a moment) into animation.gif or .webp."""
    from ..views.animate import make_animation

    with handle_errors(debug):
        anim = make_animation(run_dir, format, out=out, fps=fps, every=every, size=size, loop=loop, hold=hold,
                              overwrite=overwrite, caption=caption, badge=badge)
    if json:
        print_json({"animation": str(anim.path), "frames": len(anim.steps), "steps": anim.steps,
                    "injected": anim.injected, "width": anim.size[0], "height": anim.size[1],
                    "durations_ms": anim.durations_ms})
    w, h = anim.size
    noise = f", noise at step {', '.join(map(str, anim.injected))}" if anim.injected else ""
    _wrote(quiet or json, f"Wrote {anim.path} ({len(anim.steps)} frames, {w}x{h}, {fps:g} fps{noise})")


def sheet(
    run_dir: RunDir,
    steps: Annotated[str | None, typer.Option(help="Steps to show, e.g. 1,5,10,20.")] = None,
    count: Annotated[
        int | None, typer.Option(help="Show N steps evenly spaced, first, last and injected included "
                                      "(default up to 16).")
    ] = None,
    columns: Annotated[int | None, typer.Option(help="Cells per row (default: a near-square grid).")] = None,
    size: Annotated[int, typer.Option(help="Longer side of each cell's picture in pixels.")] = 256,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here (.png, .jpg or .webp) instead of "
                                                                 "RUN_DIR/sheet.png.")] = None,
    attention: Annotated[str | None, typer.Option(
        "--attention", metavar="WORD", help="The heat maps of WORD (a run made with --attention) instead of the "
        "frames, in RUN_DIR/sheet-attention-WORD.png.")] = None,
    overwrite: Overwrite = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """A contact sheet: chosen steps in a grid, each labelled with its step and timestep, injected steps badged."""
    from ..views.draw import parse_steps
    from ..views.sheet import make_sheet

    with handle_errors(debug):
        chosen = parse_steps(steps) if steps is not None else None
        result = make_sheet(run_dir, steps=chosen, count=count, columns=columns, size=size, out=out,
                            overwrite=overwrite, attention=attention)
    if json:
        print_json({"sheet": str(result.path), "steps": result.steps, "injected": result.injected,
                    "columns": result.columns, "rows": result.rows, "width": result.size[0],
                    "height": result.size[1], "cell": list(result.cell)})
    grid = f"{result.columns}x{result.rows}"
    noise = f", noise at step {', '.join(map(str, result.injected))}" if result.injected else ""
    _wrote(quiet or json, f"Wrote {result.path} ({len(result.steps)} steps, {grid} grid{noise})")


def compare(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR...", show_default=False,
                                   help="Two or more run folders (or folders of them); each is compared to the "
                                        "first.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: ./outputs/<time>-compare).")
    ] = None,
    align: Annotated[
        str | None,
        typer.Option(help="For runs with different steps: index (i-th frame with i-th) or progress "
                          "(nearest fraction of each run's schedule)."),
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="Animation format: gif or webp.")] = "gif",
    fps: Annotated[float, typer.Option(help="Animation frames per second (at most 50).")] = 10,
    size: Annotated[int, typer.Option(help="Longer side of each picture in pixels.")] = 256,
    count: Annotated[int, typer.Option(help="Rows (steps) on the comparison sheet, evenly spaced, the injected "
                                            "ones included.")] = 8,
    columns: Annotated[int, typer.Option(help="Steps side by side on the comparison sheet.")] = 1,
    loop: Annotated[bool, typer.Option("--loop/--no-loop", help="Loop the animation forever, or play once.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty --out folder.")] = False,
    attention: Annotated[str | None, typer.Option(
        "--attention", metavar="WORD", help="Compare the heat maps of WORD (runs made with --attention) instead of "
        "the frames.")] = None,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Compare runs step by step: side-by-side animation, sheet, and per-step difference heat maps."""
    from ..views.compare import make_compare

    with handle_errors(debug):
        result = make_compare(run_dirs, out, align=align, fmt=format, fps=fps, size=size, count=count,
                              columns=columns, loop=loop, overwrite=overwrite, attention=attention)
    if json:
        print_json(result)
    letters = result["letters"]
    mads = ", ".join(f"{n} vs A: {m:.3f}" for n, m in zip(letters[1:], result["mean_mad"]))
    _wrote(quiet or json, f"Wrote {result['out']}/ (compare.{format.lower()}, sheet.png, diff/, compare.json) · "
                          f"{len(result['steps'])} steps · mean |difference| {mads} (levels of 255)")


def grid(
    run_dirs: RunDirs,
    x: Annotated[str | None, typer.Option("--x", metavar="OPTION", show_default=False,
                                          help="The option along the columns, as generate spells it (seed, mask, "
                                               "inject-at-step...); default: the one with the most values.")] = None,
    y: Annotated[str | None, typer.Option("--y", metavar="OPTION", show_default=False,
                                          help="The option down the rows; default: the other one that varies."
                                          )] = None,
    step: Annotated[int | None, typer.Option(metavar="K", show_default=False,
                                             help="Show each run's frame of step K instead of its final image."
                                             )] = None,
    size: Annotated[int, typer.Option(help="Longer side of each picture in pixels.")] = 256,
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="Write here (.png, .jpg or .webp); default: a new "
                                                  "./outputs/<time>-grid.png.")] = None,
    overwrite: Overwrite = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """An X/Y grid of runs: laid out by the one or two options their requests differ in, with the values as
    row and column headers."""
    from ..views.grid import make_grid

    with handle_errors(debug):
        made = make_grid(run_dirs, x=x, y=y, step=step, size=size, out=out, overwrite=overwrite)
    if json:
        print_json(made.to_json())
    axes = " by ".join(f"{name.replace('_', '-')} ({n})" for name, n in ((made.x, len(made.columns)),
                                                                         (made.y, len(made.rows))) if name)
    what = f"step {made.step}" if made.step is not None else "final images"
    _wrote(quiet or json, f"Wrote {made.path} ({len(made.cells)} runs, {axes or 'one run'}, {what})")


def show(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", show_default=False,
                                            help="A run folder, or a folder of run folders (a batch's --out).")],
    json: Annotated[bool, typer.Option("--json", help="Print run.json (or the list of runs) as one JSON object "
                                                      "on stdout.")] = False,
    debug: Debug = False,
) -> None:
    """Summarise a run: parameters, model, seed, status, timings per phase and per step. Given a folder of runs:
    one row per run, with what sets it apart from the first."""
    from ..record.rundir import read_run
    from ..views.runs import find_runs, is_run

    with handle_errors(debug):
        inside = find_runs([run_dir]) if run_dir.is_dir() and not is_run(run_dir) else []
        if inside:
            listing = _listing(run_dir, inside)
        else:
            run = read_run(run_dir, need_frames=False)
    from rich.console import Console

    if inside:
        if json:
            print_json(listing)
        else:
            Console(highlight=False).print(_listing_table(listing))
        return
    if json:
        print_json(run.manifest)
        return
    Console(highlight=False).print(_summary(run))


def _listing(folder: Path, dirs: list[Path]) -> dict:
    """FOLDER's runs: per run its folder, status, prompt, seed, steps and what differs from the first run."""
    from ..errors import BadInput
    from ..record.rundir import read_run
    from ..request import OPTIONS
    from ..views.runs import NA, describe, is_default, settings

    rows, first = [], None
    for d in dirs:
        try:
            run = read_run(d, need_frames=False)
        except BadInput as e:
            rows.append({"run": str(d), "name": d.name, "status": "unreadable", "error": str(e)})
            continue
        values = settings(run)
        differs = {}
        if first is not None:
            for name, value in values.items():
                if name == "prompt" or value is NA or value == first[name]:  # the prompt has its own column
                    continue
                if first[name] is NA and is_default(OPTIONS[name], value):  # applies here only, as it would anyway
                    continue
                differs[name] = describe(name, value)
        m = run.manifest
        rows.append({"run": str(d), "name": d.name, "status": run.status, "prompt": values["prompt"],
                     "seed": m.get("seed", values["seed"]), "steps": m.get("total_steps") or values["steps"],
                     "frames": len(run.frames), "differs": differs, "error": m.get("error"),
                     "first": first is None})
        first = values if first is None else first
    return {"folder": str(folder), "runs": rows}


def _listing_table(listing: dict):
    from rich.table import Table
    from rich.text import Text

    colours = {"complete": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "killed": "red",
               "unreadable": "red"}
    table = Table(title=f"{listing['folder']} · {len(listing['runs'])} runs", title_justify="left",
                  show_edge=False, pad_edge=False)
    for name in ("folder", "status", "prompt", "seed", "steps", "differs from the first"):
        table.add_column(name, overflow="fold")
    for row in listing["runs"]:
        if row["status"] == "unreadable":
            table.add_row(row["name"], Text("unreadable", style="red"), Text(row["error"], style="red"), "", "", "")
            continue
        differs = "(the first)" if row["first"] else " · ".join(row["differs"].values()) or "nothing"
        table.add_row(Text(row["name"]), Text(row["status"], style=colours.get(row["status"], "white")),
                      Text(str(row["prompt"] or "")), str(row["seed"]), str(row["steps"]), Text(differs))
    return table


def _summary(run):
    """A Rich renderable describing RUN."""
    from rich.table import Table
    from rich.text import Text

    from ..request import OPTIONS
    from ..views.draw import sparkline
    from ..views.plot import SETTLED, settling_step

    m = run.manifest
    req = m.get("request") or {}
    model = m.get("model") or {}
    t = m.get("timings") or {}
    status = run.status
    colour = {"complete": "green", "failed": "red", "interrupted": "yellow", "running": "cyan",
              "killed": "red"}.get(status, "white")

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()

    def row(name: str, value) -> None:
        if value not in (None, "", [], {}):
            table.add_row(name, value if isinstance(value, Text) else Text(str(value)))

    row("run", str(run.dir))
    row("status", Text(status + (" (run.json says running, but no process is writing it)" if status == "killed"
                                 else ""), style=f"bold {colour}"))
    row("error", Text(str(m["error"]), style="red") if m.get("error") else None)
    where = model.get("location")
    if model.get("name"):
        row("model", model["name"] + (f" ({where})" if where and where != model["name"] else ""))
    row("seed", m.get("seed"))
    steps, first = m.get("total_steps") or req.get("steps"), m.get("first_step")
    if steps:
        row("steps", f"{steps}" + (f" (from step {first})" if first and first > 1 else ""))
    if m.get("width") and m.get("height"):
        row("size", f"{m['width']}x{m['height']}")
    row("device", " ".join(str(x) for x in (m.get("device"), m.get("dtype")) if x))
    for name, opt in OPTIONS.items():  # every option the run was given, as the declarations name them
        value = req.get(name)
        if name in ("model", "seed", "steps", "width", "height", "device", "dtype") or value in (None, "", []):
            continue
        if value == opt.default or (isinstance(opt.default, tuple) and value == list(opt.default)):
            continue
        row(name.replace("_", " "), ", ".join(map(str, value)) if isinstance(value, list) else value)
    row("injected at", ", ".join(map(str, m.get("injected_at") or [])))
    settles = settling_step(m.get("measures") or {})
    if m.get("measures"):
        row("x0 settles", f"at step {settles} (changes under {SETTLED:.0%} a step from there on)" if settles else
            "not within the run")
    n_frames = len(m.get("frames") or [])
    frames_note = f"{n_frames}" + (f" ({len(run.missing)} missing on disk)" if run.missing else "")
    row("frames", frames_note if n_frames else "none")
    row("image", m.get("image"))
    row("created", m.get("created"))

    step_times = [s for s in t.get("steps") or [] if s is not None]
    for phase in ("load", "prepare"):
        if t.get(phase) is not None:
            row(phase, f"{t[phase]:.3f} s")
    if step_times:
        total = sum(step_times)
        row("steps time", f"{total:.3f} s · {total / len(step_times):.3f} s/step "
                          f"(min {min(step_times):.3f}, max {max(step_times):.3f})")
        row("per step", Text(sparkline(step_times), style="cyan"))
    for phase in ("decode", "total"):
        if t.get(phase) is not None:
            row(phase, f"{t[phase]:.3f} s")
    return table
