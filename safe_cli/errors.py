"""Domain errors the CLI turns into messages and exit codes (no traceback unless --debug)."""


class SafeError(Exception):
    """Bad usage, a bad profile or bad input: exit code 2. The message names the file and key."""

    exit_code = 2


class RunFailed(SafeError):
    """A run that failed or a check that found a problem: exit code 1."""

    exit_code = 1
