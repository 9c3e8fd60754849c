"""Reading a batch file: JSON Lines (one object per line, keys are the request's fields with - or _) or plain
text (one prompt per line; blank lines and # comments skipped). The first line that is neither tells which: `{`
means JSON Lines. A UTF-8 byte-order mark is ignored; a key given twice in a line is an error, not "the last wins".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import BadInput
from ..request import OPTIONS


class BadLines(BadInput):
    """One or more lines of a batch file are invalid; .errors holds (line, message) for each, .parsed the good ones."""

    def __init__(self, errors: list[tuple[int, str]], parsed: list | None = None):
        self.errors, self.parsed = errors, parsed or []
        line, message = errors[0]
        more = f" (and {len(errors) - 1} more bad line{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
        super().__init__(f"line {line}: {message}{more}")


def read_source(source) -> list[tuple[int, dict]]:
    """(line number, values) for each run in SOURCE: a path, '-' for stdin, or a list of dicts/prompts.

    Raises BadLines for lines that can't be read as a run (bad JSON, unknown or repeated keys).
    """
    if isinstance(source, (list, tuple)):
        parsed, errors = [], []
        for number, item in enumerate(source, 1):
            try:
                parsed.append((number, normalise(item if isinstance(item, dict) else {"prompt": item})))
            except BadInput as e:
                errors.append((number, str(e)))
        return _or_raise(parsed, errors)
    return parse_text(_read_text(source))


def _read_text(source) -> str:
    if str(source) == "-":
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        raise BadInput(f"batch file {str(path)!r} does not exist" if not path.exists() else
                       f"batch file {str(path)!r} is not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"batch file {str(path)!r} cannot be read: {e}") from None


def parse_text(text: str) -> list[tuple[int, dict]]:
    """JSON Lines if the first line that is not blank or a # comment starts with '{', else one prompt per line."""
    lines = text.removeprefix("\ufeff").splitlines()
    first = next((s.strip() for s in lines if s.strip() and not s.strip().startswith("#")), "")
    jsonl = first.startswith("{")
    parsed, errors = [], []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not jsonl:
            parsed.append((number, {"prompt": line}))
            continue
        try:
            parsed.append((number, normalise(_json_object(line))))
        except BadInput as e:
            errors.append((number, str(e)))
    return _or_raise(parsed, errors)


def _json_object(line: str) -> dict:
    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:
            raise BadInput(f"key {repeated!r} is given twice")
        return dict(pairs)

    try:
        values = json.loads(line, object_pairs_hook=no_repeats)
    except ValueError as e:
        raise BadInput(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadInput("not valid JSON (nested too deeply)") from None
    if not isinstance(values, dict):
        raise BadInput(f"expected a JSON object like {{\"prompt\": \"...\"}}, got {type(values).__name__}")
    return values


def _or_raise(parsed, errors):
    if errors:
        raise BadLines(errors, parsed)
    return parsed


def normalise(values: dict) -> dict:
    """Keys as the request's field names (dashes or underscores), each once; values are checked by validated()."""
    out = {}
    for key, value in values.items():
        name = str(key).strip().replace("-", "_")
        if name not in OPTIONS:
            raise BadInput(f"unknown key {key!r}; allowed: {', '.join(OPTIONS)}")
        if name in out:
            raise BadInput(f"key {key!r} is given twice")
        out[name] = value
    return out
