"""`sdstream diagnostics`, `models`, `masks`: the facts a user checks before a run.

The facts come from sdstream.diagnostics as plain dicts; this module only renders them:
Rich tables on stdout for people, or one JSON value on stdout with --json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import handle_errors, print_json

JSON_HELP = "Print one JSON value on stdout instead of tables."
DEBUG_HELP = "Show tracebacks."


def register(app: typer.Typer) -> None:
    app.command("diagnostics")(diagnostics)
    app.command("models")(models)
    app.command("masks")(masks)


def diagnostics(
    check: Annotated[
        bool, typer.Option("--check", help="Also load `tiny` on the chosen device, run a few steps, report it/s.")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Also load this model and show where each component sits."),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Python, libraries, GPUs and memory, and the device and dtype sdstream would use here.

    Exits 1 when --check fails (an error, or NaN/inf in the output).
    """
    from .. import diagnostics as diag
    from ..errors import SdstreamError

    with handle_errors(debug):
        # Loads first, facts last: then "allocated by this process" counts what was loaded.
        extra = {}
        if model is not None:
            extra["model"] = diag.placement(model)
        if check:
            extra["check"] = diag.check()
        facts = {**diag.collect(), **extra}
        if json:
            print_json(facts)
        else:
            _render_diagnostics(facts)
        if check and not facts["check"]["ok"]:
            c = facts["check"]
            raise SdstreamError(f"--check failed on {c['device']} ({c['dtype']}): {c['error']}")


def models(
    json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Every model alias: its source, family, and whether (and where) it is on disk."""
    from .. import diagnostics as diag

    with handle_errors(debug):
        rows = diag.models()
        if json:
            print_json(rows)
            return
        from rich.table import Table

        default = next((r["alias"] for r in rows if r["default"]), None)
        table = Table(title="Models (--model ALIAS; a Hugging Face repo id or a local folder works too)",
                      caption="* the default (set $SDSTREAM_MODEL to change it)" if default else None)
        table.add_column("alias", no_wrap=True)
        table.add_column("family", no_wrap=True)
        table.add_column("source", no_wrap=True)
        table.add_column("on disk", no_wrap=True)
        table.add_column("size", justify="right", no_wrap=True)
        table.add_column("path", overflow="fold")
        for r in rows:
            on_disk = "[green]yes[/]" if r["on_disk"] else "[dim]no[/]"
            table.add_row(r["alias"] + (" *" if r["default"] else ""), r["family"], r["source"], on_disk,
                          _bytes(r["size_bytes"]), r["path"] or "")
        _stdout().print(table)


def masks(
    preview: Annotated[
        Path | None, typer.Option("--preview", help="Write each mask as DIR/<name>.png (white = noise).")
    ] = None,
    size: Annotated[int, typer.Option("--size", min=1, max=4096, help="Side of the --preview PNGs in pixels.")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace PNGs of these names already in DIR.")] = False,
    json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """The noise-mask patterns for --mask, each with a small preview (white/█ = where noise goes)."""
    # numpy only: listing masks must stay fast, so no torch here (see test_info.py).
    from ..errors import BadInput
    from ..masks import PATTERNS, mask_array

    with handle_errors(debug):
        files = {}
        if preview is not None:
            if preview.exists() and not preview.is_dir():
                raise BadInput(f"--preview {str(preview)!r} is a file; give a folder for the PNGs")
            from PIL import Image

            from ..record.files import save_image

            taken = [f"{name}.png" for name in PATTERNS if (preview / f"{name}.png").exists()]
            if taken and not overwrite:
                raise BadInput(f"--preview {str(preview)!r} already holds {', '.join(taken[:3])}"
                               f"{' …' if len(taken) > 3 else ''}; pass --overwrite to replace them")
            preview.mkdir(parents=True, exist_ok=True)
            for name in PATTERNS:
                pixels = (mask_array(name, size, size) * 255).astype("uint8")
                files[name] = preview / f"{name}.png"
                save_image(Image.fromarray(pixels), files[name])
        rows = [
            {"name": name, "description": description, "aliases": list(aliases),
             "file": str(files[name]) if name in files else None}
            for name, (description, aliases) in PATTERNS.items()
        ]
        if json:
            print_json(rows)
            return
        _render_masks(rows, [_blocks(mask_array(r["name"], 16, 16)) for r in rows])
        if files:
            _stdout().print(f"Wrote {len(files)} PNGs ({size}x{size}) to {preview}/")


# --- rendering -------------------------------------------------------------------------------




def _stdout():
    """Rich on stdout; into a file or a pipe, wide enough that nothing is folded mid-name (repo ids, paths)."""
    import sys

    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def _kv(title: str, rows: list[tuple[str, object]]):
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", min_width=60)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    return table


def _render_diagnostics(f: dict) -> None:
    from rich.table import Table

    out = _stdout()
    py, plat, cpu, lib = f["python"], f["platform"], f["cpu"], f["libraries"]
    out.print(_kv(f"sdstream {f['sdstream']}", [
        ("Python", f"{py['version']} ({py['implementation']}) {py['executable']}"),
        ("Platform", plat["description"]),
        ("CPU cores", f"{cpu['logical_cores']} ({cpu['usable_cores']} usable, torch uses {cpu['torch_threads']})"),
        ("RAM", f"{_bytes(cpu['ram_total_bytes'])} ({_bytes(cpu['ram_available_bytes']) or '?'} free)"),
        *[(name, version or "not installed") for name, version in lib.items()],
    ]))

    cuda, mps = f["cuda"], f["mps"]
    if cuda["devices"]:
        gpus = Table(title="GPUs", title_justify="left")
        for col in ("device", "name", "capability", "total", "free", "allocated", "reserved"):
            gpus.add_column(col)
        for g in cuda["devices"]:
            if "error" in g and "name" not in g:
                gpus.add_row(g["device"], f"[red]{g['error']}[/]", "", "", "", "", "")
                continue
            gpus.add_row(g["device"], g.get("name"), g.get("compute_capability"), _bytes(g.get("total_memory_bytes")),
                         _bytes(g.get("free_memory_bytes")), _bytes(g.get("allocated_bytes")),
                         _bytes(g.get("reserved_bytes")))
        out.print(gpus)
    elif cuda["torch_cuda"] or cuda["torch_hip"]:
        out.print(
            "[bold]No GPU found:[/] this torch build supports CUDA, but no GPU is visible; sdstream runs on the CPU."
        )
    else:
        out.print(f"[bold]No GPU:[/] torch {lib['torch']} is a CPU-only build; sdstream runs on the CPU "
                  "(fine for tiny; a real model takes minutes per image).")
    out.print(_kv("Accelerators", [
        ("CUDA (torch build)", cuda["torch_cuda"] or "none"),
        *([("ROCm/HIP (torch build)", cuda["torch_hip"])] if cuda["torch_hip"] else []),
        ("cuDNN", cuda["cudnn"]),
        ("NVIDIA driver", cuda["driver"]),
        ("Apple MPS", "available" if mps["available"] else ("built, not available" if mps["built"] else "no")),
        *[("warning", w) for w in cuda["warnings"]],
    ]))

    ch, hf = f["choice"], f["huggingface"]
    out.print(_kv("sdstream would use", [
        ("device (--device auto)", ch["device"]),
        ("dtype (--dtype auto)", ch["dtype"]),
        ("model (default)", ch["model"]),
    ]))
    out.print(_kv("Hugging Face", [
        ("hub cache", hf["hub_cache"]),
        ("HF_HOME", hf["hf_home"]),
        ("offline", "yes (HF_HUB_OFFLINE): only models already on disk load" if hf["offline"] else "no"),
        ("HF_TOKEN", "set" if hf["hf_token_set"] else "not set"),
    ]))

    if "model" in f:
        m = f["model"]
        table = Table(title=f"Model {m['name']} ({m['location']}), loaded in {m['load_seconds']:.1f} s",
                      title_justify="left")
        for col in ("component", "class", "device", "dtype", "parameters"):
            table.add_column(col, justify="right" if col == "parameters" else "left")
        for c in m["components"]:
            params = f"{c['parameters']:,}" if c["parameters"] is not None else ""
            table.add_row(c["name"], c["class"], c["device"] or "", c["dtype"] or "", params)
        table.add_row("[bold]total[/]", "", "", "", f"[bold]{m['parameters']:,}[/]")
        out.print(table)

    if "check" in f:
        c = f["check"]
        verdict = "[green]ok[/]" if c["ok"] else f"[red]FAILED[/]: {c['error']}"
        out.print(_kv(f"Check: {c['steps']} steps of {c['model']}", [
            ("result", verdict),
            ("device, dtype", f"{c['device']}, {c['dtype']}"),
            ("load", f"{c['load_seconds']} s" if c["load_seconds"] is not None else None),
            ("speed", f"{c['steps_per_second']} it/s" if c["steps_per_second"] else None),
            ("finite output", c["finite"]),
        ]))


def _blocks(mask) -> list[str]:
    """A 0/1 array as text, two rows per line with half blocks, so pixels come out square."""
    chars = {(1, 1): "█", (1, 0): "▀", (0, 1): "▄", (0, 0): " "}
    return ["".join(chars[int(a), int(b)] for a, b in zip(top, bottom)) for top, bottom in zip(mask[0::2], mask[1::2])]


def _render_masks(rows: list[dict], previews: list[list[str]]) -> None:
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    out = _stdout()
    table = Table(title="Mask patterns (--mask NAME; or a grey-level image, white = full noise)", title_justify="left")
    for col in ("name", "aliases", "where noise is injected"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["aliases"]), r["description"])
    out.print(table)
    panels = [Panel(Text("\n".join(p)), title=r["name"], expand=False) for r, p in zip(rows, previews)]
    out.print(Columns(panels))
