"""One exit-code table for every ``stemlive`` command (documented in docs/cli.md).

Commands report a failure by raising :class:`CLIError` with one of these codes and a one-line message; the
entry point prints ``stemlive COMMAND: MESSAGE`` on stderr and exits with the code. No traceback for bad input.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``stemlive`` command line."""

    #: everything asked for was produced
    OK = 0
    #: an unexpected internal error (a bug: please report it with ``-v``)
    INTERNAL = 1
    #: the command line or a plan/parameter is refused (bad option, value out of range, refused plan)
    USAGE = 2
    #: an input file is missing, unreadable, or not what the command needs (e.g. not a v1 session file)
    BAD_INPUT = 3
    #: the command ran, but at least one result could not be produced (each reason printed, one line each)
    INCOMPLETE = 4
    #: the instrument, the service or the network failed (cannot connect, rejected, disk full, acquisition failed)
    FAILED = 5
    #: interrupted by the user (Ctrl-C / SIGINT); hardware and files are left consistent
    INTERRUPTED = 130


class CLIError(Exception):
    """A failure to report as one line and an exit code (see :class:`ExitCode`)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.BAD_INPUT) -> None:
        super().__init__(message)
        self.code = ExitCode(code)
