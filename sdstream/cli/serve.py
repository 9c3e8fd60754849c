"""`sdstream serve`: the original HTTP streaming API on the same core (extra: sdstream[serve])."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
