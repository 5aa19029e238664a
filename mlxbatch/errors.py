"""The one exception family of mlxbatch and the exit codes it maps to.

Owns: user-facing error classes. Does not own: printing them (cli/__init__.py does).
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class MlxbatchError(Exception):
    """Base of every error a user may see; the message is printed as is."""

    exit_code = EXIT_ERROR


class UsageError(MlxbatchError):
    """Bad options or job file: the command line itself is wrong."""

    exit_code = EXIT_USAGE


class InputFileError(MlxbatchError):
    """The input file as a whole cannot be read (missing, unreadable, bad schema)."""


class ModelError(MlxbatchError):
    """A model cannot be found, downloaded, converted or loaded."""


class WorkerError(MlxbatchError):
    """The workers of a `--workers` job cannot run (cluster unreachable, every worker lost)."""


class ResumeError(MlxbatchError):
    """The output folder belongs to a different job; resuming would mix results."""


class OutputError(MlxbatchError):
    """Writing results failed (disk full, I/O error, unwritable folder)."""


class Interrupted(MlxbatchError):
    """The job was stopped by a signal after committing its finished rows."""

    exit_code = EXIT_INTERRUPTED


class RowError(Exception):
    """One input row is invalid; becomes an error record, never stops the job."""

    def __init__(self, code: str, message: str, *, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the field at fault, where known (the server's 400 names it)
