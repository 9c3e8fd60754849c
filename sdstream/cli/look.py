"""`sdstream animate`, `sheet`, `compare`, `show`: looking at finished runs.

The pictures are made in sdstream.views (Pillow and numpy, no torch); this module only parses
flags, maps errors to exit codes and prints. Paths written go to stderr, or as JSON to stdout.
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
    app.command("show")(show)


RunDir = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run folder (holds run.json).", show_default=False)]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON object on stdout.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output file.")]




def animate(
    run_dir: RunDir,
    format: Annotated[
        str | None, typer.Option("--format", "-f", help="gif or webp (default: from --out's suffix, else gif).")
    ] = None,
    fps: Annotated[float, typer.Option(help="Frames per second (at most 50).")] = 10,
    every: Annotated[int, typer.Option(help="Use every Nth recorded frame (the last always).")] = 1,
    size: Annotated[
        int | None,
        typer.Option(help="Scale the longer side to this many pixels (nearest-neighbour when enlarging)."),
    ] = None,
    loop: Annotated[bool, typer.Option("--loop/--no-loop", help="Loop forever, or play once.")] = True,
    hold: Annotated[float, typer.Option(help="Seconds the last frame stays on screen beyond 1/fps.")] = 1.0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here instead of RUN_DIR/animation.<format>.")
    ] = None,
    overwrite: Overwrite = False,
    json: Json = False,
    debug: Debug = False,
) -> None:
    """Animate a run's frames (one per step, the last held a moment) into animation.gif or .webp."""
    from ..views.animate import make_animation

    with handle_errors(debug):
        anim = make_animation(
            run_dir, format, out=out, fps=fps, every=every, size=size, loop=loop, hold=hold, overwrite=overwrite
        )
    if json:
        print_json({"animation": str(anim.path), "frames": len(anim.steps), "steps": anim.steps,
                     "width": anim.size[0], "height": anim.size[1], "durations_ms": anim.durations_ms})
    else:
        w, h = anim.size
        stderr.print(f"Wrote {anim.path} ({len(anim.steps)} frames, {w}x{h}, {fps:g} fps)", soft_wrap=True)


def sheet(
    run_dir: RunDir,
    steps: Annotated[str | None, typer.Option(help="Steps to show, e.g. 1,5,10,20.")] = None,
    count: Annotated[
        int | None, typer.Option(help="Show N steps evenly spaced, first and last included (default up to 16).")
    ] = None,
    columns: Annotated[int | None, typer.Option(help="Cells per row (default: a near-square grid).")] = None,
    size: Annotated[int, typer.Option(help="Longer side of each cell's picture in pixels.")] = 256,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of RUN_DIR/sheet.png.")] = None,
    overwrite: Overwrite = False,
    json: Json = False,
    debug: Debug = False,
) -> None:
    """A contact sheet PNG: chosen steps in a grid, each labelled with its step and timestep."""
    from ..views.draw import parse_steps
    from ..views.sheet import make_sheet

    with handle_errors(debug):
        chosen = parse_steps(steps) if steps is not None else None
        result = make_sheet(run_dir, steps=chosen, count=count, columns=columns, size=size, out=out,
                            overwrite=overwrite)
    if json:
        print_json({"sheet": str(result.path), "steps": result.steps, "columns": result.columns,
                     "rows": result.rows, "width": result.size[0], "height": result.size[1]})
    else:
        grid = f"{result.columns}x{result.rows}"
        stderr.print(f"Wrote {result.path} ({len(result.steps)} steps, {grid} grid)", soft_wrap=True)


def compare(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR", help="Two or more run folders; each is compared to the first.")
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
    count: Annotated[int, typer.Option(help="Rows on the comparison sheet, evenly spaced.")] = 8,
    loop: Annotated[bool, typer.Option("--loop/--no-loop", help="Loop the animation forever, or play once.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty --out folder.")] = False,
    json: Json = False,
    debug: Debug = False,
) -> None:
    """Compare runs step by step: side-by-side animation, sheet, and per-step difference heat maps."""
    from ..views.compare import make_compare

    with handle_errors(debug):
        result = make_compare(run_dirs, out, align=align, fmt=format, fps=fps, size=size, count=count, loop=loop,
                              overwrite=overwrite)
    if json:
        print_json(result)
    else:
        mads = ", ".join(f"{i + 2} vs 1: {m:.3f}" for i, m in enumerate(result["mean_mad"]))
        stderr.print(f"Wrote {result['out']}/ (compare.{format.lower()}, sheet.png, diff/, compare.json) · "
                     f"{len(result['steps'])} steps · mean |difference| {mads}", soft_wrap=True)


def show(
    run_dir: RunDir,
    json: Annotated[bool, typer.Option("--json", help="Print run.json as one JSON object on stdout.")] = False,
    debug: Debug = False,
) -> None:
    """Summarise a run: parameters, model, seed, status, timings per phase and per step."""
    from ..record.rundir import read_run

    with handle_errors(debug):
        run = read_run(run_dir, need_frames=False)
    if json:
        print_json(run.manifest)
        return
    from rich.console import Console

    Console(highlight=False).print(_summary(run))


def _summary(run):
    """A Rich renderable describing RUN."""
    from rich.table import Table
    from rich.text import Text

    from ..request import OPTIONS
    from ..views.draw import sparkline

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
