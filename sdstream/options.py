"""Options, each declared once: its type, default, range or choices, help and what it depends on.

A request field is declared with `option(...)` on GenerationRequest (request.py); the run options of the
CLI (--out, --json, ...) with `Option(...)` in cli/common.py. Everything else follows from these
declarations: the CLI's options and help (cli/), the checks and their one-line errors (`check`, `parse`),
the HTTP body and the /ui form (serve/), `show`, the PNG parameters text and the README's option table
(tools/options_table.py, compared by tests/test_options.py). Pure Python: no torch, no typer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .errors import BadInput

# text, int, float, flag (on/off), steps (step numbers: 5,8), picture (a file), choice (one of choices()),
# names (several of choices(): latents,x0), pairs (K:TEXT, repeated: a step and a text)
KINDS = ("text", "int", "float", "flag", "steps", "picture", "choice", "names", "pairs")
# the longest text any option takes: the text encoders read a few hundred tokens, paths end at 4096 bytes, and a
# 10 MB prompt would only fill run.json and the PNG's parameters (the server's own limit, --max-prompt, is lower)
MAX_TEXT = 10_000


@dataclass(frozen=True)
class Option:
    """One option. KIND is one of KINDS; DEFAULT is what a run uses when the option is not given."""

    kind: str
    default: object
    help: str
    panel: str = "Options"
    range: tuple[float, float] | None = None  # inclusive bounds of an int, float or steps value
    choices: Callable[[], Sequence[str]] | None = None  # the allowed names (from a registry, read when needed)
    canonical: Callable[[str], str | None] | None = None  # an alias -> its name (None: not a choice)
    or_picture: bool = False  # a choice that may also be a picture file (--mask)
    needs: str | None = None  # "mask" (given), "scheduler=ddim|auto", "preview!=none": refused without it
    short: str | None = None  # "-p"
    long: str | None = None  # the flag, where it is not the name with dashes (--from for from_run)
    metavar: str | None = None
    api: str | None = None  # the HTTP body's name for it, where the original service named it otherwise
    served: bool = True  # a field of POST /generate (device and speed options belong to the server)
    cli: bool = True  # an option of `generate` (a branch's parent and step are arguments of `branch`)
    a1111: str | None = None  # its key in the A1111 "parameters" text of final.png
    shown_default: str | None = None  # the default in words, where it follows from something else
    name: str = ""  # filled in from the field it declares

    @property
    def flag(self) -> str:
        return self.long or "--" + self.name.replace("_", "-")

    @property
    def api_name(self) -> str:
        return self.api or self.name

    def names(self) -> list[str]:
        return list(self.choices()) if self.choices else []

    # ---------------------------------------------------------------- values

    def parse(self, text):
        """The value of TEXT as given on the command line (a str, or a list of them for repeatable kinds)."""
        if self.kind == "names":
            return tuple(p for item in text for p in re.split(r"[,\s]+", str(item).strip()) if p)
        if self.kind == "pairs":
            return tuple(text)  # each "K:TEXT"; check() reads them
        if self.kind == "steps":
            parts = [p for item in text for p in re.split(r"[,\s]+", str(item).strip()) if p]
            try:
                return tuple(int(p) for p in parts)
            except ValueError:
                raise BadInput(f"{self.flag} {','.join(map(str, text))!r} is not allowed: {self._allowed()}") from None
        if self.kind in ("int", "float"):
            try:
                number = int(text) if self.kind == "int" else float(text)
            except ValueError:
                raise BadInput(f"{self.flag} {text!r} is not allowed: {self._allowed()}") from None
            return number
        return text

    def check(self, value):
        """VALUE (from the CLI, a batch line or an HTTP body) made canonical, or BadInput naming what is allowed."""
        kind = self.kind
        if value is None:
            if self.default is None or self.needs:  # an option that may be left out
                return None
            if kind in ("int", "float", "steps"):
                raise BadInput(f"{self.flag} None is not allowed: {self._allowed()}")
            raise BadInput(f"{self.flag} None is not allowed: give " + ("true or false" if kind == "flag" else
                           f"one of: {', '.join(self.names())}" if kind == "choice" else "text"))
        if kind == "flag":
            if not isinstance(value, bool):
                raise BadInput(f"{self.flag} {value!r} is not allowed: give true or false")
            return value
        if kind in ("text", "picture", "choice"):
            if not isinstance(value, str):
                raise BadInput(f"{self.flag} {value!r} is not allowed: give text")
            if len(value) > MAX_TEXT:
                raise BadInput(f"{self.flag} is {len(value):,} characters long: at most {MAX_TEXT:,}")
            if kind == "choice":
                return self._choice(value)
            if self.default is None and not value.strip():  # --model '', --init-image '': never "the default"
                raise BadInput(f"{self.flag} {value!r} is empty: give a value, or leave the option out")
            return value
        if kind == "names":
            return self._names(value)
        if kind == "pairs":
            return self._pairs(value)
        if kind == "steps":
            steps = (value,) if _is_int(value) else value
            if not isinstance(steps, (tuple, list)) or not all(_is_int(s) for s in steps):
                raise BadInput(f"{self.flag} {value!r} is not allowed: {self._allowed()}")
            for s in steps:
                self._in_range(s)
            return tuple(sorted(set(steps)))
        ok = _is_int(value) if kind == "int" else _is_number(value)
        if not ok:
            raise BadInput(f"{self.flag} {value!r} is not allowed: {self._allowed()}")
        self._in_range(value)
        return value

    def _names(self, value) -> tuple[str, ...]:
        """Several of choices() (or "all"), in their declared order, each once."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (tuple, list)) or not all(isinstance(v, str) for v in items):
            raise BadInput(f"{self.flag} {value!r} is not allowed: give names from: {', '.join(self.names())}")
        wanted = {v.strip().lower().replace("_", "-") for v in items if v.strip()}
        if "all" in wanted:
            return tuple(self.names())
        unknown = sorted(wanted - set(self.names()))
        if unknown:
            raise BadInput(f"{self.flag} {unknown[0]!r} is not one of: {', '.join(self.names())}, all")
        return tuple(n for n in self.names() if n in wanted)

    def _pairs(self, value) -> tuple[tuple[int, str], ...]:
        """(step, text) pairs from "K:TEXT" strings or [K, TEXT] lists, sorted by step, each step once."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (tuple, list)):
            raise BadInput(f"{self.flag} {value!r} is not allowed: give K:TEXT, e.g. 10:a green circle")
        pairs = {}
        for item in items:
            if isinstance(item, str):
                step, colon, text = item.partition(":")
                step = int(step) if step.strip().isdigit() else None
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                step, text, colon = item[0], item[1], ":"
            else:
                step = colon = text = None
            if not colon or not _is_int(step) or not isinstance(text, str):
                raise BadInput(f"{self.flag} {item!r} is not allowed: give K:TEXT, e.g. 10:a green circle")
            self._in_range(step)
            if step in pairs:
                raise BadInput(f"{self.flag}: step {step} is given twice")
            pairs[step] = text
        return tuple(sorted(pairs.items()))

    def _choice(self, value: str) -> str:
        name = self.canonical(value) if self.canonical else (value if value in self.names() else None)
        if name is not None:
            return name
        if self.or_picture:
            from pathlib import Path

            if Path(value).suffix or Path(value).expanduser().exists():
                return value  # a picture file: decoded (and checked) with the other pictures
            raise BadInput(f"{self.flag} {value!r} is not one of: {', '.join(self.names())} (or a picture file)")
        raise BadInput(f"{self.flag} {value!r} is not one of: {', '.join(self.names())}")

    def _in_range(self, value) -> None:
        if self.range and not self.range[0] <= value <= self.range[1]:
            raise BadInput(f"{self.flag} {value!r} is not allowed: {self._allowed()}")

    def _allowed(self) -> str:
        lo, hi = self.range or (None, None)
        if self.kind == "steps":
            return f"give step numbers from {lo:g} to {hi:g}, e.g. 5,8 (or the option twice)"
        if self.kind == "pairs":
            return f"give a step from {lo:g} to {hi:g}"
        what = "a whole number" if self.kind == "int" else "a number"
        return f"give {what} from {lo:g} to {hi:g}" if self.range else f"give {what}"

    # ---------------------------------------------------------------- dependencies

    def need(self) -> tuple[str, str | None, bool]:
        """(field, value, negated) of NEEDS: 'mask' -> ('mask', None, False), 'preview!=none' -> (.., 'none', True)."""
        found = re.fullmatch(r"(\w+)(?:(!?=)(.+))?", self.needs or "")
        return found.group(1), found.group(3), found.group(2) == "!="

    def applies(self, values: dict) -> bool:
        """Whether what this option needs is in VALUES (field -> value, after canonical names)."""
        if not self.needs:
            return True
        other, wanted, negated = self.need()
        have = values.get(other)
        if wanted is None:  # given: a value, a list that is not empty, a flag that is on
            return have not in (None, (), False)
        return (have not in wanted.split("|")) if negated else (have in wanted.split("|"))

    def needs_text(self, options: dict[str, Option]) -> str:
        """What the option needs, as the user would type it: '--mask', '--scheduler ddim', 'frames'."""
        other, wanted, negated = self.need()
        flag, wanted = options[other].flag, (wanted or "").split("|")[0]  # (the first of alternatives: the one to give)
        if not wanted:
            return flag
        return f"a {flag} other than {wanted}" if negated else f"{flag} {wanted}"

    # ---------------------------------------------------------------- description (help, schema, README)

    def describe(self) -> dict:
        """What a form or a document needs to know of the option (GET / of the server, the README table)."""
        return {
            "name": self.name, "api": self.api_name, "flag": self.flag, "kind": self.kind,
            "default": list(self.default) if isinstance(self.default, tuple) else self.default,
            "panel": self.panel, "label": self.a1111,
            "range": list(self.range) if self.range else None, "choices": self.names() or None,
            "needs": self.needs, "help": self.help, "shown_default": self.default_text(),
        }

    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.default is None or self.default == "" or self.default is False or self.default == ():
            return ""
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


def option(default, help: str, panel: str = "Options", *, kind: str | None = None, **settings):
    """A dataclass field declaring an Option. A field that needs another (NEEDS) is None when not given:
    then a check can tell "not given" from "given the default", and the default is filled in when it applies."""
    kind = kind or _kind_of(default)
    if kind not in KINDS:
        raise ValueError(kind)
    declared = Option(kind=kind, default=default, help=help, panel=panel, **settings)
    stored = None if declared.needs else default
    return field(default=stored, metadata={"option": declared})


def options_of(cls) -> dict[str, Option]:
    """name -> Option for every field of the dataclass CLS that declares one, in declaration order."""
    from dataclasses import fields

    return {f.name: replace(f.metadata["option"], name=f.name) for f in fields(cls) if "option" in f.metadata}


def _kind_of(default) -> str:
    if isinstance(default, bool):
        return "flag"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    return "text"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
