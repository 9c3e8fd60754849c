"""Sets of runs: finding them (a run folder, or a folder of run folders such as a batch's --out), what each was
asked for, and how they differ: for compare's column labels, grid's axes and `show` of a folder of runs."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..record.rundir import MANIFEST, RunRecord, read_run


class _NotApplicable:
    """An option that does not apply to a run (--noise-strength without --mask): no value, and no difference."""

    def __repr__(self) -> str:
        return "n/a"


NA = _NotApplicable()

# How an option reads on a label: 'inject 10', 'noise strength 0.5' (default: its name with spaces).
SHORT = {"inject_at_step": "inject", "negative_prompt": "negative", "init_image": "init image",
         "prompt_image": "image prompt", "frames_every": "frames every", "guidance": "guidance"}
QUOTED = ("prompt", "negative_prompt")


def is_run(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def run_folders(path: str | Path) -> list[Path]:
    """The run folders inside PATH (its immediate subfolders with a run.json), by name."""
    path = Path(path)
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink() and is_run(p))
    except OSError:
        return []


def find_runs(paths: list[str | Path]) -> list[Path]:
    """PATHS as run folders: each a run folder, or a folder of run folders (a batch's --out) standing for them
    all. BadInput (one line) for a path that is neither."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise BadInput(f"run folder {str(p)!r} does not exist")
        if not p.is_dir():
            raise BadInput(f"{str(p)!r} is a file, not a run folder")
        inside = [p] if is_run(p) else run_folders(p)
        if not inside:
            raise BadInput(f"{str(p)!r} has no {MANIFEST} and no run folders in it; is it an sdstream run folder?")
        found += inside
    return found


def settings(run: RunRecord) -> dict[str, object]:
    """Option name -> the value the run used, as hashable values (lists as tuples), NA where the option did not
    apply. The injection steps are the ones the run used (a bare --mask's default too); the size, seed and model
    are the ones it ran with."""
    from ..request import OPTIONS

    m = run.manifest
    req = dict(m.get("request") or {})
    req = {k: tuple(v) if isinstance(v, list) else v for k, v in req.items()}
    if m.get("width") and m.get("height"):
        req.update(width=m["width"], height=m["height"])
    if m.get("seed") is not None:
        req["seed"] = m["seed"]
    if req.get("model") is None and (m.get("model") or {}).get("name"):
        req["model"] = m["model"]["name"]
    if m.get("preview"):  # what --preview auto turned out to be
        req["preview"] = m["preview"]
    if req.get("mask") is not None and m.get("inject_steps"):
        req["inject_at_step"] = tuple(m["inject_steps"])
    out = {}
    for name, opt in OPTIONS.items():
        value = req.get(name, opt.default)
        out[name] = NA if opt.needs and not opt.applies(req) else value
    return out


def differing(all_settings: list[dict[str, object]]) -> list[str]:
    """The options whose values differ between the runs (among the runs where each applies), in declaration
    order."""
    if not all_settings:
        return []
    names = []
    for name in all_settings[0]:
        values = {_key(s[name]) for s in all_settings if s[name] is not NA}
        if len(values) > 1:
            names.append(name)
    return names


def telling(all_settings: list[dict[str, object]]) -> list[str]:
    """The options a label shows to tell the runs apart: the ones that differ, and the ones that apply to some of
    the runs only, where they have a value other than their default (the 'inject 10' of the run with a mask)."""
    from ..request import OPTIONS

    names = differing(all_settings)
    for name, opt in OPTIONS.items():
        applies = {s[name] is not NA for s in all_settings}
        if name not in names and len(applies) == 2 and any(not is_default(opt, s[name]) for s in all_settings
                                                           if s[name] is not NA):
            names.append(name)
    return [n for n in OPTIONS if n in names]


def dependents(name: str) -> list[str]:
    """The options that apply only with option NAME (inject-at-step and noise-strength for mask)."""
    from ..request import OPTIONS

    return [n for n, opt in OPTIONS.items() if opt.needs and opt.need()[0] == name]


def is_default(opt, value) -> bool:
    default = opt.default
    return value == (tuple(default) if isinstance(default, (list, tuple)) else default)


def _key(value):
    return (type(value).__name__, value) if isinstance(value, bool) else value


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_name(text: str, what: str) -> str:
    """An option as the CLI spells it ('inject-at-step', '--seed', 'noise_strength') -> its field name."""
    from ..request import OPTIONS

    name = text.strip().lstrip("-").replace("-", "_").lower()
    if name not in OPTIONS:
        close = [n for n in OPTIONS if name and (name in n or n in name)]
        hint = f" (did you mean {', '.join(flag(n)[2:] for n in close)}?)" if close else ""
        raise BadInput(f"{what} {text!r} is not an option of a run{hint}; give one as generate spells it, "
                       "e.g. seed, mask, inject-at-step, guidance")
    return name


def describe(name: str, value) -> str:
    """NAME = VALUE as a label reads it: 'seed 3', 'mask circle', 'no mask', 'inject 10', '"a red circle"'."""
    from ..request import OPTIONS

    label = SHORT.get(name, name.replace("_", " "))
    if value is NA:
        return f"{label} n/a"
    if value is None or value == () or value == "":
        return f"no {label}"
    if name in QUOTED:
        return f'{"negative " if name == "negative_prompt" else ""}"{value}"'
    if isinstance(value, bool):
        return label if value else f"no {label}"
    if isinstance(value, tuple):
        return f"{label} {','.join(map(_num, value))}"
    if isinstance(value, str) and (OPTIONS[name].kind == "picture" or name == "mask" and value not in _patterns()):
        return f"{label} {Path(value).name}"
    return f"{label} {_num(value)}"


def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label(values: dict[str, object], names: list[str]) -> str:
    """The run's values of NAMES, described and joined with ' · ' (options that do not apply left out)."""
    return " · ".join(describe(n, values[n]) for n in names if values[n] is not NA)


def order(values: list) -> list:
    """Distinct VALUES in the order an axis shows them: 'none' first, then numbers (and step lists) ascending;
    other values (prompts, masks) in the order the runs have them."""
    distinct = list(dict.fromkeys(values))
    none = [v for v in distinct if v is None or v is NA]
    rest = [v for v in distinct if v is not None and v is not NA]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rest)
    steps = all(isinstance(v, tuple) for v in rest)
    if rest and (numeric or steps):
        rest.sort()
    return none + rest


def summary(run: RunRecord) -> str:
    """One line saying what a run was: '"a red circle" · seed 3 · 25 steps · ddim · noise (circle) at 10'."""
    m, req = run.manifest, run.manifest.get("request") or {}
    parts = [f'"{req.get("prompt")}"' if req.get("prompt") else "(no prompt)"]
    parts.append(f"seed {m.get('seed', req.get('seed'))}")
    if m.get("total_steps") or req.get("steps"):
        parts.append(f"{m.get('total_steps') or req.get('steps')} steps")
    if req.get("scheduler"):
        parts.append(str(req["scheduler"]))
    if req.get("guidance") is not None:
        parts.append(f"guidance {_num(req['guidance'])}")
    injected = m.get("injected_at") or m.get("inject_steps") or []
    if req.get("mask") is not None and injected:
        mask = req["mask"] if req["mask"] in _patterns() else Path(str(req["mask"])).name
        parts.append(f"noise ({mask}) at step {','.join(map(str, injected))}")
    return " · ".join(parts)


def _patterns() -> tuple[str, ...]:
    from ..masks import PATTERNS

    return tuple(PATTERNS)


def read_runs(paths: list[str | Path], *, need_frames: bool = False) -> list[RunRecord]:
    return [read_run(p, need_frames=need_frames) for p in find_runs(paths)]
