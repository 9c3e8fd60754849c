"""The `sdstream` console script. Its first instruction takes over Ctrl-C and SIGTERM, before typer, rich or
torch are imported, so that an interrupt at any moment ends with exit 130 (143), never a traceback."""


def main() -> None:
    from . import interrupts

    interrupts.install()
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        import sys

        print("Interrupted." if interrupts.exit_code() == 130 else "Terminated.", file=sys.stderr)
        raise SystemExit(interrupts.exit_code()) from None
    try:
        cli()
    finally:
        if interrupts.received() is not None:
            # Handled and reported, but CPython may still end the process by SIGINT at exit (exit status -2, not
            # 130) when the KeyboardInterrupt passed through certain C frames on its way: leave with our code.
            import os
            import sys

            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(interrupts.exit_code())
