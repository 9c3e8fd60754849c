"""The `sdstream` command. One module per command group; nothing here imports torch."""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(
    name="sdstream",
    help="Record the denoising process of Stable Diffusion: a picture of every step, on disk.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdstream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Record the denoising process of Stable Diffusion: a picture of every step, on disk.

    Exit codes: 0 success, 1 runtime failure, 2 bad usage or input, 130 interrupted (143 on SIGTERM).
    """


from . import batch, generate, info, look, serve, trajectory  # noqa: E402  (each registers its commands on app)

for _group in (generate, batch, trajectory, info, look, serve):
    _group.register(app)


# how help names a value: as people write it, not as the Python type Typer would show (<str>, <list[Path]>)
_PLAIN = {"str": "TEXT", "int": "N", "float": "X", "Path": "PATH", "path": "PATH", "file": "FILE", "directory": "DIR"}


def _plain_help_types(command) -> None:
    """Give every option and argument of COMMAND (and its subcommands) a value label from _PLAIN, a flag none."""
    ctx = typer.Context(command)
    for param in command.params:
        if getattr(param, "is_flag", False):
            label = ""
        elif param.param_type_name == "option" and param.metavar is not None:
            continue  # declared (N, K:TEXT, ...)
        else:
            raw = param.display_type(ctx).strip("<>")
            many = raw.startswith("list[") or param.nargs != 1
            raw = raw.removeprefix("list[").removesuffix("]")
            label = "|".join(_PLAIN.get(part, part) for part in raw.split("|")) + ("..." if many else "")
        param.display_type_rich = lambda ctx, label=label: label
    help_option = command.get_help_option  # made per call, not among the params

    def no_type(ctx, made=help_option):
        option = made(ctx)
        if option is not None:
            option.display_type_rich = lambda ctx: ""
        return option

    command.get_help_option = no_type
    for sub in getattr(command, "commands", {}).values():
        _plain_help_types(sub)


def main() -> None:
    """The console script: click's usage errors (an unknown option, a missing argument) as one `Error:` line."""
    import sys

    from typer.exceptions import TyperException
    from typer.main import get_command

    from .. import interrupts

    try:
        command = get_command(app)
        _plain_help_types(command)
        code = command(standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command's own handling (parsing, importing)
        code = interrupts.exit_code()
    except TyperException as e:  # click's usage errors, as Typer raises them
        from .common import error

        error(e.format_message())
        code = getattr(e, "exit_code", 2)
    sys.exit(code or 0)
