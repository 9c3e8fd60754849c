"""`sdstream serve`: the original HTTP streaming API on the same core (extra: sdstream[serve])."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import handle_errors, stderr

EXTRA_MISSING = "sdstream serve needs the serve extra: pip install 'sdstream[serve]'"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[
        str, typer.Option(help="Interface to bind. The default only accepts connections from this machine.")
    ]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    preload: Annotated[
        list[str] | None,
        typer.Option("--preload", help="Load this model at start-up (repeatable); others load on first use."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Requests that may wait behind the running one; more get 503.")
    ] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps: where every run goes.")] = "auto",
    allow_host: Annotated[
        list[str] | None,
        typer.Option("--allow-host", help="Also accept this name in the Host header (repeatable; '*' for any)."),
    ] = None,
    any_model: Annotated[
        bool, typer.Option("--any-model", help="Let clients name any hub repo id or server folder, not just aliases "
                                               "and --preload models.")
    ] = False,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's log level: critical, error, warning, info, debug.")
    ] = "info",
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Serve the HTTP streaming API: POST /generate streams every step as server-sent events; /ui in a browser.

    Routes: GET / (info), POST /generate, GET /health, GET /diagnostics, GET /ui, GET /openapi.json.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        from rich.markup import escape

        stderr.print(f"[bold red]Error:[/] {escape(EXTRA_MISSING)}", soft_wrap=True)
        raise typer.Exit(2) from None

    with handle_errors(debug):
        from ..request import GenerationRequest
        from ..server import create_app
        from ..server import preload as load_models

        GenerationRequest(device=device).validated()  # a bad --device is exit 2 before anything loads
        models = tuple(preload or ())
        if models:
            stderr.print(f"Loading {', '.join(models)} …")
            load_models(list(models), device)
        bound = f"[{host}]" if ":" in host else host
        app = create_app(device=device, max_queue=max_queue, allowed_hosts=(bound, *(allow_host or ())),
                         models=models, any_model=any_model)
    shown = "localhost" if host in ("127.0.0.1", "::1") else bound
    stderr.print(
        f"sdstream serve: http://{shown}:{port}/ui (API: POST /generate, schema: /openapi.json)", soft_wrap=True
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
