"""`sdstream diagnostics`, `models`, `masks`: the facts a user checks before a run."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
