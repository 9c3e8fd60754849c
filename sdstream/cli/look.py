"""`sdstream animate`, `sheet`, `compare`, `show`: looking at finished runs."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
