"""The README's table of `sdstream generate` options, made from their declarations (request.py, cli/common.py).

    python tools/options_table.py            # print it
    python tools/options_table.py --write    # put it into README.md between its markers

tests/test_options.py fails when the README's table is not what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- generate-options:start -->", "<!-- generate-options:end -->"


def table() -> str:
    from sdstream.cli.common import RUN_OPTIONS, needs_help
    from sdstream.request import OPTIONS

    rows = ["| option | default | what it does |", "|---|---|---|"]
    for opt in (*(o for o in OPTIONS.values() if o.cli), *RUN_OPTIONS.values()):
        names = ", ".join([*([opt.short] if opt.short else []), opt.flag])
        usage = (names if opt.kind == "flag" else f"{names} {opt.metavar or 'TEXT'}").replace("|", "\\|")
        default = opt.default_text()
        shown = default if opt.shown_default is not None else f"`{default}`" if default else ""
        rows.append(f"| `{usage}` | {shown} | {opt.help}{needs_help(opt) if opt.needs else ''} |")
    return "\n".join(rows)


def in_readme(text: str) -> str | None:
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str]) -> int:
    if "--write" in argv:
        text = README.read_text()
        head, rest = text.split(START, 1)
        README.write_text(head + START + "\n" + table() + "\n" + END + rest.split(END, 1)[1])
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
