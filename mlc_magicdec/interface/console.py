"""Where the commands print: progress and notices to stderr, tables and results to stdout."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from rich.console import Console

from ..errors import UserError

TABLE_WIDTH = 160  # tables are printed this wide when the output is not a terminal (logs, CI, files)

status = Console(stderr=True)
results = Console(width=None if Console().is_terminal else TABLE_WIDTH)


def progress(message: str) -> None:
    """One dim line of progress on stderr."""
    status.print(f"[dim]{message}[/dim]")


def command_line() -> str:
    """The command being run, as a user would type it (the program's name, not its install path)."""
    program = Path(sys.argv[0]).name
    if program == "__main__.py":  # python -m mlc_magicdec.cli
        program = "mlc-magicdec"
    return shlex.join([program, *sys.argv[1:]])


def check_output_folder(path: str | Path | None) -> None:
    """A results file's folder must exist before the run, not be found missing after an hour of benchmarks."""
    if path not in (None, "-") and not Path(path).parent.is_dir():
        raise UserError(f"folder {Path(path).parent} does not exist; create it or choose another output path")


def read_prompt(path: Path) -> str:
    """The text of a prompt file, or a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else e
        raise UserError(f"cannot read prompt file {path}: {reason}") from None
