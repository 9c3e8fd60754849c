"""What every command shares: error -> exit code mapping, and the progress and JSON sinks."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from contextlib import contextmanager

import typer
from rich.console import Console

stderr = Console(stderr=True, highlight=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (frames and manifest kept) but exiting 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextmanager
def handle_errors(debug: bool = False):
    """Turn exceptions into `Error: …` on stderr and the documented exit codes."""
    from ..errors import SdstreamError

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except SdstreamError as e:
        if debug:
            traceback.print_exc()
        error(str(e))
        if e.hint:
            stderr.print(f"Hint: {e.hint}", soft_wrap=True, markup=False)
        raise typer.Exit(e.exit_code) from None
    except Terminated:
        stderr.print("Terminated: frames so far and run.json are kept.")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        stderr.print("Interrupted: frames so far and run.json are kept.")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        if debug:
            traceback.print_exc()
        error(f"{type(e).__name__}: {e}")
        if not debug:
            stderr.print("Run again with --debug for the traceback.")
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def error(message: str) -> None:
    """`Error: MESSAGE` on stderr; the message is printed as is (no Rich markup: it may hold brackets)."""
    from rich.text import Text

    stderr.print(Text.assemble(("Error:", "bold red"), " ", message), soft_wrap=True)


def json_sink(event: dict) -> None:
    """One JSON object per line on stdout, flushed so a pipe sees each step as it happens."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class ProgressSink:
    """A spinner while the model loads, then a bar with step n/N, it/s and ETA, on stderr."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,  # the summary line replaces it
        )
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "load":
            self.task = self.progress.add_task(f"loading {event['model']}", total=None, speed="")
        elif kind == "start":
            steps = event["total_steps"] - event["first_step"] + 1
            self.progress.update(self.task, description=f"seed {event['seed']}", total=steps, completed=0)
            self.progress.reset(self.task, total=steps, description=f"seed {event['seed']}", speed="")
        elif kind == "step":
            self.progress.advance(self.task)
            speed = self.progress.tasks[self.task].speed
            if speed:
                self.progress.update(self.task, speed=f"{speed:.1f} it/s")
        elif kind == "done":
            self.progress.update(self.task, description="done")
