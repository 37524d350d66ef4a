"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""


class LlmctlError(Exception):
    """A user-facing error. The CLI prints `llmctl: error: <message>` and exits with `exit_code`."""

    exit_code = 2


class Interrupted(LlmctlError):
    """Training stopped on SIGTERM/SIGINT after saving a resumable state."""

    exit_code = 143
