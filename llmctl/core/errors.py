"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""


def first_line(text: str, limit: int | None = None) -> str:
    """The first non-empty line of a (library's multi-line) message, cut to `limit` characters."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), str(text))[:limit]


class LlmctlError(Exception):
    """A user-facing error. The CLI prints `llmctl: error: <message>` and exits with `exit_code`."""

    exit_code = 2


class Interrupted(LlmctlError):
    """Training stopped on SIGTERM/SIGINT after saving a resumable state."""

    exit_code = 143
