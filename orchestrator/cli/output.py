"""What the CLI prints: every line (made safe for a terminal), tables, live bars, questions,
and the one place where an error becomes a line and an exit code."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import typer

from infra.errors import InfraError  # no AWS library behind it: cheap to import

from ..errors import DlboxError, Interrupted, UsageError
from ..humanize import clean
from ..ui import Ui

EXIT_INFRA = 1
EXIT_INTERRUPTED = 130


def echo(message: str, err: bool = False, fg: str | None = None) -> None:
    """Every line dlbox prints: much of it comes from the box (log lines, file names, its
    stderr), so control characters are shown escaped, never obeyed by the terminal."""
    typer.secho(clean(message), err=err, fg=fg)


def say(message: str) -> None:
    echo(message)


def warn(message: str) -> None:
    echo(f"dlbox: warning: {message}", err=True, fg=typer.colors.YELLOW)


def error_line(message: str) -> None:
    """An error said while the command goes on to its end (a cluster run stopped)."""
    echo(f"dlbox: error: {message}", err=True, fg=typer.colors.RED)


def fail(message: str, code: int) -> typer.Exit:
    error_line(message)
    return typer.Exit(code)


@contextlib.contextmanager
def errors(interrupted_hint: str | Callable[[KeyboardInterrupt], str] | None = None
           ) -> Iterator[None]:
    """The one place where errors become a line and an exit code, by their type.
    interrupted_hint: what Ctrl-C leaves and what to do (a callable: as things are then)."""
    try:
        yield
    except Interrupted as exc:  # a step cut short that said what it leaves
        echo(f"dlbox: interrupted; {exc}", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(exc.exit_code) from None
    except DlboxError as exc:
        raise fail(str(exc), exc.exit_code) from None
    except InfraError as exc:
        raise fail(str(exc), EXIT_INFRA) from None
    except OSError as exc:  # this machine's files: a full disk, a folder not writable
        where = f"{exc.filename}: " if exc.filename else ""
        raise fail(f"{where}{exc.strerror or exc}; free space or fix the permissions, then run "
                   "the command again", EXIT_INFRA) from None
    except KeyboardInterrupt as exc:
        hint = interrupted_hint(exc) if callable(interrupted_hint) else interrupted_hint
        echo("dlbox: interrupted" + (f"; {hint}" if hint else ""), err=True,
             fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def confirm(question: str, yes: bool, refusal: str) -> None:
    """Go on if --yes was given or the user says so at a terminal; else one line, exit 2."""
    if yes:
        return
    if sys.stdin.isatty() and sys.stdout.isatty():
        if typer.confirm(question, default=False):
            return
        raise UsageError("nothing was ended")
    raise UsageError(refusal)


def table(rows: list[tuple[str, str]], header: tuple[str, ...] | None = None) -> None:
    """Rows as a table on a terminal; piped, tab-separated lines for scripts."""
    if not sys.stdout.isatty():
        for row in (header, *rows) if header else rows:
            typer.echo("\t".join(clean(cell) for cell in row))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if header:
        shown = Table(*header)
        for row in rows:
            shown.add_row(*(Text(clean(cell)) for cell in row))
    else:
        shown = Table(show_header=False, box=None)
        for key, value in rows:
            shown.add_row(Text(clean(key), style="bold"), Text(clean(value)))
    Console().print(shown)


@contextlib.contextmanager
def transfer_bar():
    """A progress bar with bytes/s and ETA for uploads, on a terminal; else no bar."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich import progress as rp

    with rp.Progress("sending", rp.BarColumn(), rp.DownloadColumn(), rp.TransferSpeedColumn(),
                     rp.TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("sync", total=None, visible=False)  # shown once bytes move
        yield lambda done, total: bar.update(task, completed=done, total=total, visible=True)


@contextlib.contextmanager
def status_bar():
    """(say, on_status) for follow: a live bar with metrics and ETA on a terminal.

    Epoch lines go through the bar's console so they scroll above it; off a terminal
    (a pipe, a log file, CI) there is no bar, only those lines.
    """
    if not sys.stdout.isatty():
        yield say, None
        return
    from rich import progress as rp

    from ..follow import bar_view

    eta = rp.TextColumn("{task.fields[eta]}")
    # markup=False: the description and metrics come from the box's status.json
    with rp.Progress(rp.TextColumn("{task.description}", markup=False), rp.BarColumn(),
                     rp.MofNCompleteColumn(),
                     rp.TextColumn("{task.fields[metrics]}", markup=False), eta,
                     transient=True) as bar:
        task = bar.add_task("starting", total=None, metrics="", eta="")

        def on_status(status: dict) -> None:
            view = bar_view(status)
            if view is None:
                bar.update(task, visible=False)
                return
            left = "" if view.eta_seconds is None else f"ETA {hms(view.eta_seconds)}"
            bar.update(task, description=view.label, completed=view.step, total=view.steps,
                       metrics=view.metrics, eta=left, visible=True)

        yield (lambda line: bar.console.print(clean(line), markup=False, highlight=False)), on_status


def hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


# How the lifecycle speaks here: every line through echo, questions at the terminal.
UI = Ui(say=say, warn=warn, err=lambda line: echo(line, err=True), fail=error_line,
        confirm=confirm, transfer=transfer_bar, status=status_bar)
