"""The one exception type a user can cause; the CLI prints it on one line and exits non-zero."""


class BlossomError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""


class ConfigError(BlossomError):
    pass


class DataError(BlossomError):
    pass


class ModelError(BlossomError):
    pass
