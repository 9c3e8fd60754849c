"""`sdstream plot`: the per-step measures of one or more runs as one chart (matplotlib, drawn off-screen).

Four panels, one line per run: how much x0 still changes from step to step (log scale), the guidance gap, the
latents' standard deviation and the noise injected; injection steps are marked with a dotted line. Runs are
named in the legend by what differs between them (their folder names when nothing does).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..record import files as _files
from ..record.rundir import read_run

PANELS = (  # (measure, title, y label, log scale)
    ("x0_change", "x0 change from the step before", "|Δx0| / |x0|", True),
    ("guidance_gap", "guidance gap", "rms(ε_cond − ε_uncond)", False),
    ("latent_std", "latent spread", "std(latents)", False),
    ("injected_rms", "noise injected", "rms(noise)", False),
)
SETTLED = 0.05  # x0 has settled once it changes by less than this from step to step, for good


def settling_step(measures: dict, threshold: float = SETTLED) -> int | None:
    """The step from which x0 changes by less than THRESHOLD (relative) at every later step, or None."""
    steps, changes = measures.get("steps") or [], measures.get("x0_change") or []
    settled = None
    for step, change in zip(steps, changes):
        if change is not None and change >= threshold:
            settled = None
        elif settled is None and change is not None:
            settled = step
    return settled


def _value(value) -> str:
    if value in (None, [], ""):
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    text = str(value)
    return text if len(text) <= 32 else text[:31] + "…"


def _labels(runs) -> list[str]:
    """Each run named by the request fields in which the runs differ (its folder's name when none do)."""
    from ..request import OPTIONS

    def plain(name, value):  # an option that applies with another and took its default says nothing of its own
        opt = OPTIONS.get(name)
        if opt is None or not opt.needs:
            return value
        return None if value == (list(opt.default) if isinstance(opt.default, tuple) else opt.default) else value

    requests = [{k: plain(k, v) for k, v in (r.manifest.get("request") or {}).items()} for r in runs]
    differ = [k for k in requests[0] if len({repr(q.get(k)) for q in requests}) > 1 and k not in ("parent",)]
    if not differ or len(runs) == 1:
        return [r.name for r in runs]
    return [" · ".join(f"{k.replace('_', ' ')} {_value(q.get(k))}" for k in differ[:3]) for q in requests]


def make_plot(run_dirs, out=None, *, overwrite: bool = False) -> dict:
    """Draw the measures of RUN_DIRS into OUT (default outputs/<time>-plot.png); what was drawn."""
    if not run_dirs:
        raise BadInput("plot needs one or more run folders")
    runs = [read_run(d, need_frames=False) for d in run_dirs]
    bare = [r.name for r in runs if not r.measures.get("steps")]
    if bare:
        raise BadInput(f"run {bare[0]!r} has no measures in its run.json (made by an older sdstream, or it stopped "
                       "before its first step)")
    out = Path(out) if out is not None else _files.new_dir(Path("outputs"), "plot").with_suffix(".png")
    if out.suffix.lower() != ".png":
        raise BadInput(f"--out {str(out)!r}: the plot is a PNG; give a name ending in .png")
    if out.exists() and not overwrite:
        raise BadInput(f"{str(out)!r} exists; pass --overwrite or choose another --out")

    import matplotlib

    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = _labels(runs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110, constrained_layout=True)
    for ax, (name, title, ylabel, log) in zip(axes.flat, PANELS):
        for run, label in zip(runs, labels):
            m = run.measures
            points = [(s, v) for s, v in zip(m["steps"], m.get(name) or []) if v is not None and (v > 0 or not log)]
            if points:
                ax.plot(*zip(*points), marker=".", linewidth=1.5, label=label)
            for step in run.injected:
                ax.axvline(step, linestyle=":", color="grey", linewidth=1)
        if log and ax.lines:
            ax.set_yscale("log")
            ax.axhline(SETTLED, linestyle="--", color="grey", linewidth=0.8)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        columns = 1 if max(map(len, names)) > 48 else min(3, len(names))
        fig.legend(handles, names, loc="outside lower center", ncol=columns, frameon=False)
    fig.suptitle(f"{len(runs)} run{'s' * (len(runs) > 1)}: per-step measures (dotted: noise injected)")
    out.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _files.atomic_write(out, lambda f: f.write(buf.getvalue()))
    return {"plot": str(out), "runs": [str(r.dir) for r in runs], "labels": labels,
            "settles_at": [settling_step(r.measures) for r in runs]}
