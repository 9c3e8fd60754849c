"""Planning a batch: every line checked before anything runs, with the checks `generate` makes before torch
(the request, the pictures, the model's words and VAE factor, the run folder), then named and matched
against what is already on disk (resume)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import BadInput
from ..inputs import PICTURES as PICTURE_MODES
from ..inputs import Inputs, open_image
from ..models.registry import check_available, family_of_source, for_family
from ..record.files import slug
from ..record.rundir import check_folder, open_run, probe_writable
from ..request import OPTIONS, GenerationRequest, from_values
from .parse import BadLines, read_source


@dataclass
class BatchRun:
    """One line of the batch: its request (validated) and run folder, or why the line is bad."""

    line: int
    values: dict  # what the line itself set
    request: GenerationRequest | None = None
    inputs: Inputs | None = None
    run_dir: Path | None = None
    error: str | None = None  # the line is invalid
    skip: bool = False  # already complete on disk, made with the same request (resume)
    redo: list[str] = field(default_factory=list)  # options in which a complete run on disk differs: made again
    seeded: bool = False  # the seed was asked for (else it is random, drawn at validation)

    @property
    def prompt(self) -> str:
        return self.request.prompt if self.request else str(self.values.get("prompt", ""))


def defaults_of(defaults) -> dict:
    """The command line's (or a library caller's) defaults for every line, as field -> value: only what was set."""
    if defaults is None:
        return {}
    if isinstance(defaults, dict):
        return dict(defaults)
    plain = GenerationRequest()
    return {f.name: getattr(defaults, f.name) for f in fields(defaults)
            if getattr(defaults, f.name) != getattr(plain, f.name)}


def plan(source, out: str | Path, defaults=None, *, force: bool = False, keep_going: bool = False,
         check=None) -> list[BatchRun]:
    """Read and check every line, name its run folder and decide whether it needs running. Nothing is written.

    DEFAULTS (a dict of fields, or a GenerationRequest) apply to every line; an option that applies only with
    another (--noise-strength with --mask) applies to the lines that have it, and is refused if none has.
    Raises BadLines (unless KEEP_GOING, which keeps bad lines as runs with .error) and BadInput for a bad OUT.
    CHECK is an extra check of each request (the CLI's animations need frames).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {str(out)!r} is a file, not a folder")
    probe_writable(out)
    try:
        parsed, errors = read_source(source), []
    except BadLines as e:
        parsed, errors = e.parsed, list(e.errors)
    if not parsed and not errors:
        raise BadInput(f"batch file {str(source)!r} holds no runs (only blank lines and # comments)")
    given = defaults_of(defaults)
    dependent = {k: v for k, v in given.items() if OPTIONS[k].needs}
    plain = {k: v for k, v in given.items() if k not in dependent}
    try:  # the command line's own prompt and model, checked once: its error is no line's
        base = from_values(plain).validated()
    except BadInput:
        base = None  # the lines may complete what the defaults lack
    if base is not None and any("model" not in values and "prompt" not in values for _, values in parsed):
        check_available(base)
    used: set[str] = set()
    width = max([4] + [len(str(line)) for line, _ in parsed + errors])
    pictures: dict[tuple[str, str], object] = {}  # (field, path) -> decoded once for the whole batch
    runs = [BatchRun(line, values) for line, values in parsed]
    for run in runs:
        try:
            base = from_values({**plain, **run.values}).validated()
            extra = {k: v for k, v in dependent.items() if k not in run.values and OPTIONS[k].applies(vars(base))}
            used |= set(extra)
            run.request = from_values({**plain, **extra, **run.values}).validated()
            run.seeded = "seed" in run.values or "seed" in given
            run.request = for_family(run.request, family_of_source(check_available(run.request)))  # auto decided
            run.inputs = _inputs(run.request, pictures)
            if check:
                check(run.request)
            run.run_dir = out / f"{run.line:0{width}d}-{slug(run.request.prompt)}"
            check_folder(run.run_dir, overwrite=True)  # refuses folders holding anything an earlier run did not write
        except BadInput as e:
            run.request, run.run_dir = None, None
            errors.append((run.line, str(e)))
    unused = [k for k in dependent if k not in used]
    if unused and any(r.request for r in runs):
        opt = OPTIONS[unused[0]]
        raise BadInput(f"{opt.flag} applies only with {opt.needs_text(OPTIONS)}, and no line of the batch has that")
    errors.sort()
    if errors and not keep_going:
        raise BadLines(errors)
    bad = dict(errors)
    for run in runs:
        run.error = bad.pop(run.line, None)
    runs += [BatchRun(line, {}, error=message) for line, message in bad.items()]  # lines that did not parse
    runs.sort(key=lambda r: r.line)
    for run in runs:
        if run.request is not None and not force:
            _resume(run)
    return runs


def _inputs(req: GenerationRequest, cache: dict) -> Inputs:
    decoded = {}
    for name, mode in PICTURE_MODES.items():
        value = getattr(req, name)
        if value is None or (name == "mask" and req.mask_is_pattern):
            continue
        if (name, value) not in cache:
            cache[name, value] = open_image(value, OPTIONS[name].flag, mode)
        decoded[name] = cache[name, value]
    return Inputs(decoded)


def _resume(run: BatchRun) -> None:
    """Skip a line whose folder holds a finished run of the same request; note what differs when it doesn't."""
    try:
        kept = open_run(run.run_dir)
    except BadInput:
        return
    if kept.status not in ("complete", "stopped"):  # stopped: at the --stop-at-step it asked for (compared below)
        return
    now, before = run.request.to_dict(), kept.manifest.get("request") or {}
    ignore = {"device"} | (set() if run.seeded else {"seed"})  # a random seed differs every time by design
    run.redo = [OPTIONS[k].flag for k in now if k not in ignore and before.get(k) != now[k]]
    run.skip = not run.redo
