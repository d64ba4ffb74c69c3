"""The one exception type a user can cause; the CLI prints it on one line and exits non-zero."""


class BlossomError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""


class ConfigError(BlossomError):
    pass


class DataError(BlossomError):
    pass


class ModelError(BlossomError):
    pass


def first_line(e: BaseException, limit: int = 160, default: str | None = None) -> str:
    """A third-party error as a clause of a one-line message: its first line, or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__ if default is None else default])[0][:limit]
