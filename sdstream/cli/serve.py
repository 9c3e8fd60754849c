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
    max_pixels: Annotated[int, typer.Option(min=1, help="Most width x height a request may ask for.")] = 1024 * 1024,
    max_work: Annotated[
        int, typer.Option(min=1, help="Most steps x width x height a request may ask for.")
    ] = 50 * 1024 * 1024,
    max_prompt: Annotated[int, typer.Option(min=1, help="Most characters in a prompt.")] = 1000,
    max_upload_mb: Annotated[
        int, typer.Option(min=1, help="Most megabytes in one request body, base64 pictures included; "
                                        "a bigger one gets 413.")
    ] = 20,
    save: Annotated[
        str | None, typer.Option("--save", metavar="DIR", help="Also write each run into a run folder under DIR.")
    ] = None,
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

        stderr.print(f"[bold red]Error:[/] {escape(EXTRA_MISSING)}")
        raise typer.Exit(2) from None

    with handle_errors(debug):
        from pathlib import Path

        from ..request import GenerationRequest
        from ..serve.app import create_app
        from ..serve.app import preload as load_models
        from ..serve.schema import Limits

        GenerationRequest(device=device).validated()  # a bad --device is exit 2 before anything loads
        _check_port(host, port)  # before minutes of preloading, not after
        if save is not None:
            from ..record.rundir import probe_writable

            probe_writable(Path(save), "--save")
        models = tuple(preload or ())
        if models:
            stderr.print(f"Loading {', '.join(models)} …")
            load_models(list(models), device)
        bound = f"[{host}]" if ":" in host else host
        limits = Limits(max_pixels=max_pixels, max_work=max_work, max_prompt=max_prompt,
                        max_body_bytes=max_upload_mb * 1024 * 1024)
        app = create_app(device=device, max_queue=max_queue, allowed_hosts=(bound, *(allow_host or ())),
                         models=models, any_model=any_model, limits=limits, save=Path(save) if save else None)
    shown = "localhost" if host in ("127.0.0.1", "::1") else bound
    stderr.print(f"sdstream serve: http://{shown}:{port}/ui (API: POST /generate, schema: /openapi.json)")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _check_port(host: str, port: int) -> None:
    """BadInput when HOST:PORT can't be bound (in use, or not this machine's address)."""
    import socket

    from ..errors import BadInput

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise BadInput(f"--port {port} on {host} cannot be used: {e.strerror or e}") from None
